//! Accuracy targets of the trainer on the embedded digits (2,000 test digits), default settings:
//! float LeNet >= 96% within 10 epochs, 8-bit QAT within 0.5 points, 4-bit QAT within 1.5 points.

use std::process::Command;

use crate::common;

fn test_accuracy(extra: &[&str]) -> f64 {
    let out = Command::new(common::example_bin("train"))
        .args(["--json", "--device", "cpu"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["test_accuracy"].as_f64().unwrap()
}

#[test]
fn lenet_float_8bit_and_4bit_meet_the_targets() {
    let float = test_accuracy(&["--mode", "baseline"]);
    let q8 = test_accuracy(&["--mode", "quant", "--bits", "8"]);
    let q4 = test_accuracy(&["--mode", "quant", "--bits", "4"]);
    eprintln!("LeNet test accuracy: float {float:.4}, 8-bit {q8:.4}, 4-bit {q4:.4}");
    assert!(float >= 0.96, "float LeNet reached {float}");
    assert!(q8 >= float - 0.005, "8-bit QAT {q8} vs float {float}");
    assert!(q4 >= float - 0.015, "4-bit QAT {q4} vs float {float}");
}
