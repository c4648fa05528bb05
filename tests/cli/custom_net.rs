//! The `custom_net` example: a network built with `approx_sequential`, trained in float,
//! calibrated, fine-tuned quantization-aware, saved and reloaded.

use crate::common;

use std::process::Command;

use common::{example_bin, TempDir};

#[test]
fn custom_net_trains_calibrates_saves_and_reloads_identically() {
    let tmp = TempDir::new("custom-net");
    let out = tmp.0.join("net.safetensors");
    let run = |args: &[&str]| {
        Command::new(example_bin("custom_net")).arg("--out").arg(&out).args(args).output().unwrap()
    };
    let o = run(&"--threads 1 --epochs 1 --qat-epochs 1 --train-digits 2000 --json"
        .split(' ')
        .collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let acc = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
    // One float epoch on 2,000 digits, then one quantization-aware epoch (measured 82.65 / 92.55).
    assert!(acc("float_accuracy") > 75.0, "{r}");
    assert!(acc("accuracy") > 88.0 && acc("accuracy") > acc("float_accuracy"), "{r}");
    assert_eq!(acc("reload_max_diff"), 0.0, "{r}");
    let ranges = r["calibrated"].as_array().unwrap();
    assert_eq!(ranges.len(), 7, "{r}");
    // The stem sees pixel / 255, whose largest value is exactly 1.
    assert_eq!(ranges[0]["layer"], "stem");
    assert_eq!(ranges[0]["range"].as_f64(), Some(1.0));
    assert!(ranges.iter().all(|l| l["range"].as_f64().unwrap() > 0.0), "{r}");
    assert!(out.is_file());

    // Bad values are refused before training, and nothing is written.
    std::fs::remove_file(&out).unwrap();
    for (args, needle) in [
        (&["--calibrate-percentile", "0"][..], "--calibrate-percentile must be in (0, 100], got 0"),
        (&["--x-bits", "1"][..], "--x-bits: bitwidth 1 is out of range"),
        (&["--lr", "nan"][..], "--lr must be positive and finite, got NaN"),
        (&["--threads", "-1"][..], "--threads must be 0 (libtorch's default) up to"),
        (&["--batch-size", "0"][..], "--batch-size must be at least 1, got 0"),
        (&["--train-digits", "-5"][..], "--train-digits must be 0 (all) or more, got -5"),
        (&["--data", "/nonexistent/mnist"][..], "/nonexistent/mnist"),
    ] {
        let o = run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.lines().count() == 1 && err.contains(needle), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote a file");
    }
}
