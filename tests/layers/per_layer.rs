//! Per-layer controls (issue 9, part): separate activation and weight bitwidths, PACT's initial
//! alpha, PACT weights that start from the weight's range, and the trainer's flags for them.

use crate::common;

use std::process::Command;

use common::{example_bin, values, TempDir};
use tch::nn;
use tch::Device;
use torchapprox::data::Mnist;
use torchapprox::layers::{
    ApproxConv2d, ApproxConvConfig, ApproxLayer, ApproxLinear, ApproxLinearConfig, InferenceMode, QuantSpec,
};
use torchapprox::quantizers::{ApproxQuantizer, QuantizerKind};

#[test]
fn layers_take_separate_bitwidths_and_pact_alphas_from_their_spec_and_weights() {
    let vs = nn::VarStore::new(Device::Cpu);
    let spec = QuantSpec {
        x_bits: Some(8),
        w_bits: Some(3),
        init_alpha: 3.5,
        w_kind: QuantizerKind::Pact,
        mode: InferenceMode::Quantized,
        ..Default::default()
    };
    let fc = ApproxLinear::f_new(vs.root() / "fc", 50, 20, ApproxLinearConfig { bias: true, quant: spec })
        .unwrap();
    let q = fc.quant();
    assert_eq!((q.x_quantizer().bitwidth(), q.w_quantizer().bitwidth()), (8, 3));
    assert_eq!(values(q.x_quantizer().alpha().unwrap()), [3.5]);
    // A PACT weight quantizer starts at the weight's range, not at 2.2 (which would round
    // every one of these small weights to zero).
    let range = values(&fc.weight().abs().max())[0];
    assert_eq!(values(q.w_quantizer().alpha().unwrap())[0], range as f32 as f64);
    let ints = values(&q.w_quantizer().quantize(fc.weight()));
    let distinct: std::collections::BTreeSet<i64> = ints.iter().map(|v| *v as i64).collect();
    assert!(distinct.len() > 3 && distinct.iter().all(|v| v.abs() <= 3), "3-bit weights: {distinct:?}");
    let conv = ApproxConv2d::f_new(
        vs.root() / "conv",
        2,
        4,
        3,
        ApproxConvConfig { quant: spec, ..Default::default() },
    )
    .unwrap();
    let range = values(&conv.weight().abs().max())[0];
    assert_eq!(values(conv.quant().w_quantizer().alpha().unwrap())[0], range as f32 as f64);
    assert_eq!(conv.quant().w_quantizer().bitwidth(), 3);
}

#[test]
fn the_trainer_takes_x_bits_w_bits_and_per_quantizer_layer_bits() {
    let tmp = TempDir::new("per-layer");
    let data = tmp.0.join("small");
    let dir = common::embedded_dir();
    Mnist::load_dir(&dir).unwrap().subset(2000, 500).save_dir(&data).unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(example_bin("train"))
            .args(
                [
                    &["--data", data.to_str().unwrap(), "--model", "mlp", "--device", "cpu", "--json"][..],
                    args,
                ]
                .concat(),
            )
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let r = run(&["--epochs", "1", "--x-bits", "8", "--w-bits", "4", "--layer", "fc2=pact:6,minmax:3"]);
    let layers = r["layers"].as_array().unwrap();
    assert_eq!((layers[0]["x_bits"].as_u64(), layers[0]["w_bits"].as_u64()), (Some(8), Some(4)));
    assert_eq!((layers[1]["x_bits"].as_u64(), layers[1]["w_bits"].as_u64()), (Some(6), Some(3)));
    // PACT weights at 4 bits once scored 9.90% (alpha 2.2 rounded every weight to zero).
    let r = run(&["--epochs", "2", "--w-quant", "pact", "--bits", "4"]);
    let acc = r["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.7, "4-bit PACT weights: {acc}");
}

/// Logits of `x` evaluated in one batch and in batches of 7 (the last one shorter).
fn logits_by_batch(net: &torchapprox::models::Net, x: &tch::Tensor) -> (tch::Tensor, tch::Tensor) {
    tch::no_grad(|| {
        let whole = net.f_forward_t(x, false).unwrap();
        let n = x.size()[0];
        let parts: Vec<tch::Tensor> = (0..n)
            .step_by(7)
            .map(|s| net.f_forward_t(&x.narrow(0, s, 7.min(n - s)), false).unwrap())
            .collect();
        (whole, tch::Tensor::cat(&parts, 0))
    })
}

#[test]
fn evaluation_does_not_depend_on_the_batch_with_running_ranges() {
    use tch::nn::OptimizerConfig;
    use torchapprox::models::Architecture;
    use torchapprox::quantizers::RangeMode;
    let dir = common::embedded_dir();
    let m = Mnist::load_dir(&dir).unwrap().subset(640, 1000);
    let x = torchapprox::data::normalize(&m.train_images, 0.1307, 0.3081, Device::Cpu).unwrap();
    let test = torchapprox::data::normalize(&m.test_images, 0.1307, 0.3081, Device::Cpu).unwrap();
    let running = RangeMode::Running { momentum: 0.9 };
    for (kind, range, independent) in [
        (QuantizerKind::MinMax, running, true),
        (QuantizerKind::Pact, running, true),
        (QuantizerKind::Lsq, running, true),
        (QuantizerKind::MinMax, RangeMode::Batch, false),
    ] {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let spec =
            QuantSpec { x_kind: kind, x_range: range, mode: InferenceMode::Quantized, ..Default::default() };
        let net = Architecture::LeNet5.build(&vs.root(), |_| spec).unwrap();
        let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
        for s in (0..640).step_by(64) {
            let loss = net
                .f_forward_t(&x.narrow(0, s, 64), true)
                .unwrap()
                .cross_entropy_for_logits(&m.train_labels.narrow(0, s, 64));
            opt.backward_step(&loss);
        }
        let (whole, by7) = logits_by_batch(&net, &test);
        let same =
            values(&whole).iter().zip(values(&by7)).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + a.abs()));
        // Logits agree to float rounding (oneDNN picks kernels by batch size), predictions
        // and so test accuracy exactly.
        assert_eq!(same, independent, "{kind} {range:?}: logits with batches of 1,000 and of 7");
        let accuracy = |logits: &tch::Tensor| {
            logits
                .argmax(-1, false)
                .eq_tensor(&m.test_labels)
                .to_kind(tch::Kind::Double)
                .mean(tch::Kind::Double)
        };
        if independent {
            assert_eq!(
                values(&whole.argmax(-1, false)),
                values(&by7.argmax(-1, false)),
                "{kind}: predictions"
            );
            assert_eq!(values(&accuracy(&whole)), values(&accuracy(&by7)), "{kind}: test accuracy");
        }
    }
    // The running range is a variable: it saves and loads with the checkpoint.
    let vs = nn::VarStore::new(Device::Cpu);
    let spec = QuantSpec { x_kind: QuantizerKind::MinMax, x_range: running, ..Default::default() };
    let _net = Architecture::Mlp.build(&vs.root(), |_| spec).unwrap();
    assert!(vs.variables().contains_key("fc1.x_quantizer.running_max"));
}

#[test]
fn calibration_beats_alpha_2_2_where_activations_exceed_it() {
    use tch::nn::OptimizerConfig;
    use torchapprox::layers::{ApproxModule, Calibration};
    use torchapprox::models::Architecture;
    let dir = common::embedded_dir();
    let m = Mnist::load_dir(&dir).unwrap().subset(3000, 500);
    // A narrow normalisation: inputs reach about 30, far beyond PACT's initial 2.2.
    let x = torchapprox::data::normalize(&m.train_images, 0.1307, 0.03, Device::Cpu).unwrap();
    let test = torchapprox::data::normalize(&m.test_images, 0.1307, 0.03, Device::Cpu).unwrap();
    let accuracy = |net: &torchapprox::models::Net| {
        let logits = tch::no_grad(|| net.f_forward_t(&test, false).unwrap());
        values(
            &logits
                .argmax(-1, false)
                .eq_tensor(&m.test_labels)
                .to_kind(tch::Kind::Float)
                .mean(tch::Kind::Float),
        )[0]
    };
    for method in [Calibration::Max, Calibration::Percentile(99.9)] {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let net =
            Architecture::Mlp.build(&vs.root(), |_| QuantSpec { bitwidth: 4, ..Default::default() }).unwrap();
        let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
        for s in (0..3000).step_by(64) {
            let len = 64.min(3000 - s);
            let loss = net
                .f_forward_t(&x.narrow(0, s, len), true)
                .unwrap()
                .cross_entropy_for_logits(&m.train_labels.narrow(0, s, len));
            opt.backward_step(&loss);
        }
        let float = accuracy(&net);
        net.set_mode(InferenceMode::Quantized);
        let at_2_2 = accuracy(&net);
        let batches: Vec<tch::Tensor> = (0..4).map(|b| x.narrow(0, b * 64, 64)).collect();
        let ranges = net.calibrate(&batches, &|b| net.f_forward_t(b, false), method).unwrap();
        assert!(ranges.iter().all(|(_, r)| *r > 2.2), "{method:?}: {ranges:?}");
        assert_eq!(net.approx_layers()[0].1.quant().mode(), InferenceMode::Quantized, "modes are restored");
        let calibrated = accuracy(&net);
        eprintln!("{method:?}: float {float:.3}, 4-bit alpha 2.2 {at_2_2:.3}, calibrated {calibrated:.3}");
        assert!(calibrated > at_2_2 + 0.05, "{method:?}: calibrated {calibrated} vs alpha 2.2 {at_2_2}");
    }
}

#[test]
fn the_trainers_new_flags_refuse_bad_values_with_one_line() {
    for (args, needle) in [
        (vec!["--threads", "-1"], "--threads must be 0 (libtorch's default) up to"),
        (vec!["--eval-batch-size", "0"], "--eval-batch-size must be at least 1, got 0"),
        (
            vec!["--calibrate", "1", "--calibrate-percentile", "0"],
            "calibration percentile must be in (0, 100], got 0",
        ),
        (vec!["--x-bits", "1"], "--x-bits: bitwidth 1 is out of range"),
        (vec!["--w-bits", "17"], "--w-bits: bitwidth 17 is out of range"),
        (vec!["--init-alpha", "-1"], "--init-alpha must be positive and finite, got -1"),
        (vec!["--init-alpha", "NaN"], "--init-alpha must be positive and finite, got NaN"),
        (vec!["--layer", "fc1=pact:1,minmax"], "bitwidth 1 is out of range"),
    ] {
        let o = Command::new(example_bin("train"))
            .args([&["--model", "mlp", "--epochs", "1", "--device", "cpu"][..], &args[..]].concat())
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(!String::from_utf8_lossy(&o.stdout).contains("epoch"), "{args:?} trained first");
    }
}
