//! `examples/explore.rs` end to end on LeNet: per-layer multipliers searched within an
//! accuracy-drop budget use no more energy than the cheapest uniform assignment within it.

use std::process::Command;

use crate::common::{self, TempDir};

#[test]
fn the_searched_assignment_is_no_dearer_than_the_cheapest_uniform_one() {
    let tmp = TempDir::new("explore");
    let ck = tmp.0.join("lenet.safetensors");
    let o = Command::new(common::example_bin("train"))
        .args(["--model", "lenet", "--epochs", "1", "--threads", "1", "--device", "cpu", "--save"])
        .arg(&ck)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = tmp.0.join("front.png");
    let o = Command::new(common::example_bin("explore"))
        .args(["--multipliers", "mul8s_1L2N,mul8s_1L12", "--budgets", "0.5", "--eval-digits", "200"])
        .args(["--threads", "1", "--json", "--load"])
        .arg(&ck)
        .arg("--plot")
        .arg(&png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let base = r["base_validation_accuracy"].as_f64().unwrap();
    let uniform = r["uniform"].as_array().unwrap();
    assert_eq!(uniform.len(), 3, "the exact multiplier and the two candidates");
    let searched = &r["searched"][0];
    assert_eq!(searched["budget"], 0.5);
    assert_eq!(searched["assignment"].as_object().unwrap().len(), 5, "one multiplier per LeNet layer");
    let drop = |p: &serde_json::Value| 100.0 * (base - p["validation_accuracy"].as_f64().unwrap());
    assert!(drop(searched) <= 0.5 + 1e-9, "the searched assignment breaks its budget: {searched}");
    let cheapest_uniform = uniform
        .iter()
        .filter(|u| drop(u) <= 0.5 + 1e-9)
        .map(|u| u["relative_energy"].as_f64().unwrap())
        .fold(f64::MAX, f64::min);
    let energy = searched["relative_energy"].as_f64().unwrap();
    assert!(energy <= cheapest_uniform, "searched {energy} vs uniform {cheapest_uniform}: {r}");
    eprintln!(
        "explore: searched energy {energy:.4} (uniform within budget: {cheapest_uniform:.4}), {}",
        searched["assignment"]
    );
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    // Bad input: one line each.
    for (args, needle) in [
        (vec!["--budgets", "-1"], "--budgets must be finite and not negative, got -1"),
        (vec!["--multipliers", "drum:4"], "\"drum:4\" is not a built-in EvoApprox multiplier"),
    ] {
        let o =
            Command::new(common::example_bin("explore")).args(&args).arg("--load").arg(&ck).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(needle) && e.trim().lines().count() == 1, "{args:?}: {e}");
    }
}
