//! TorchScript layer rewrite (scripts/fixtures/make_rewrite_fixtures.py): rewritten models run and train in
//! Rust, reload in PyTorch with the same logits, equal the crate's own layers, learn their alphas
//! with PACT's gradient, keep their accuracy, and refuse what they cannot do.

use crate::common;

use std::path::PathBuf;
use std::process::Command;

use common::{assert_close, fixture_path, load_fixture, TempDir};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};
use torchapprox::approx::Multiplier;
use torchapprox::data::normalize;
use torchapprox::layers::{ApproxModule, InferenceMode, QuantSpec};
use torchapprox::models::Architecture;
use torchapprox::quantizers::QuantizerKind;
use torchapprox::torchscript::{FinetuneConfig, LayerOp, RewriteConfig, ScriptModel, TracedAttention};

fn rewrite_fixture(name: &str) -> PathBuf {
    fixture_path("rewrite").join(format!("{name}.pt"))
}

fn ts_fixture(name: &str) -> PathBuf {
    fixture_path("torchscript").join(format!("{name}.pt"))
}

fn float_accuracy(name: &str) -> f64 {
    let e: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_path("rewrite/expected.json")).unwrap()).unwrap();
    e["float_accuracy"][name].as_f64().unwrap()
}

#[test]
fn rewritten_models_reload_in_pytorch_with_the_same_logits() {
    let tmp = TempDir::new("rw-reload");
    let m = common::embedded_digits();
    let train = normalize(&m.train_images.narrow(0, 0, 512), 0.0, 1.0, Device::Cpu).unwrap();
    let x = load_fixture("torchscript/probe.safetensors")["x"].shallow_clone();
    let spec4 = QuantSpec { x_bits: Some(4), w_bits: Some(4), per_channel: true, ..Default::default() };
    let minmax_fc =
        QuantSpec { x_kind: QuantizerKind::MinMax, w_kind: QuantizerKind::Pact, ..Default::default() };
    for (path, config, n_layers) in [
        (rewrite_fixture("resnet_scripted"), RewriteConfig::default(), 9),
        (
            rewrite_fixture("resnet_traced"),
            RewriteConfig { default: spec4, overrides: vec![("fc".into(), minmax_fc)], strict: false },
            9,
        ),
        (ts_fixture("mlp_scripted"), RewriteConfig { default: spec4, ..Default::default() }, 2),
    ] {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let mut model = ScriptModel::load(&path, Device::Cpu).unwrap();
        let report = model.quantize_layers(&config).unwrap();
        assert_eq!(report.layers.len(), n_layers, "{name}: {report:?}");
        assert!(report.left_in_float.is_empty(), "{name}: {:?}", report.left_in_float);
        model.calibrate(&train, 2, 128).unwrap();
        // Each PACT quantizer's alpha is a parameter under the crate's names.
        let params: Vec<String> = model.parameters().unwrap().into_iter().map(|(n, _)| n).collect();
        for l in &report.layers {
            let has = |q: &str| params.contains(&format!("{}.{q}.alpha", l.name));
            assert_eq!(has("x_quantizer"), l.spec.x_kind == QuantizerKind::Pact, "{name} {}", l.name);
            assert_eq!(has("w_quantizer"), l.spec.w_kind == QuantizerKind::Pact, "{name} {}", l.name);
        }
        let y = tch::no_grad(|| model.forward(&x).unwrap());
        let out = tmp.0.join(format!("{name}-q.pt"));
        model.save(&out).unwrap();
        let back = ScriptModel::load(&out, Device::Cpu).unwrap();
        assert_close(
            &tch::no_grad(|| back.forward(&x).unwrap()),
            &y,
            0.0,
            1e-6,
            &format!("{name}: Rust reload"),
        );
        common::pytorch_agrees("torchscript_reload_check.py", &out, &x, y, &name);
    }
}

/// Loss and every alpha gradient of the rewritten model and of the crate's network on the same batch.
fn loss_and_alpha_grads(
    forward: impl Fn(&Tensor) -> Tensor,
    alphas: &[(String, Tensor)],
    x: &Tensor,
    y: &Tensor,
) -> (Tensor, Vec<f64>) {
    for (_, a) in alphas {
        let mut g = a.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let logits = forward(x);
    logits.cross_entropy_for_logits(y).backward();
    (logits.detach(), alphas.iter().map(|(_, a)| a.grad().double_value(&[0])).collect())
}

#[test]
fn rewritten_layers_equal_the_crates_layers_in_quantized_mode() {
    let m = common::embedded_digits();
    let x = normalize(&m.test_images.narrow(0, 0, 64), 0.0, 1.0, Device::Cpu).unwrap();
    let y = m.test_labels.narrow(0, 0, 64);
    for (name, arch, per_channel) in [
        ("lenet_traced", Architecture::LeNet5, false),
        ("lenet_traced", Architecture::LeNet5, true),
        ("mlp_scripted", Architecture::Mlp, false),
    ] {
        let what = format!("{name} per_channel {per_channel}");
        let mut model = ScriptModel::load(ts_fixture(name), Device::Cpu).unwrap();
        let spec = QuantSpec { per_channel, init_alpha: 1.0, ..Default::default() };
        // alpha = 1.0 clips part of every layer's input, so that every alpha gets a gradient.
        model.quantize_layers(&RewriteConfig { default: spec, ..Default::default() }).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let net = arch
            .build(&vs.root(), |_| QuantSpec {
                per_channel,
                mode: InferenceMode::Quantized,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            model.import_into(&vs).unwrap().copied.len(),
            vs.variables().len(),
            "{what}: alphas imported too"
        );
        net.set_mode(InferenceMode::Quantized);
        let ts_alphas: Vec<(String, Tensor)> =
            model.parameters().unwrap().into_iter().filter(|(n, _)| n.ends_with("alpha")).collect();
        let rs_alphas: Vec<(String, Tensor)> =
            ts_alphas.iter().map(|(n, _)| (n.clone(), vs.variables()[n].shallow_clone())).collect();
        for (_, a) in &ts_alphas {
            let _ = a.set_requires_grad(true);
        }
        let (a, ga) = loss_and_alpha_grads(|x| model.forward(x).unwrap(), &ts_alphas, &x, &y);
        let (b, gb) = loss_and_alpha_grads(|x| net.forward_t(x, false), &rs_alphas, &x, &y);
        assert_close(&a, &b, 0.0, 1e-5, &format!("{what}: logits"));
        for ((n, ga), gb) in ts_alphas.iter().map(|(n, _)| n).zip(&ga).zip(&gb) {
            assert!(ga.abs() > 0.0, "{what}: {n} got no gradient");
            assert!((ga - gb).abs() <= 1e-3 * (1.0 + gb.abs()), "{what}: {n} gradient {ga} vs {gb}");
        }
        // Approximate mode: an EvoApprox multiplier of large error, through the crate's
        // operators in TorchScript and through the crate's layers.
        let mult = Multiplier::evoapprox("mul8s_1L2J").unwrap();
        model.set_multiplier(Some(&mult)).unwrap();
        net.set_mode(InferenceMode::Approximate);
        net.set_multiplier(Some(mult.clone()));
        let (a, ga) = loss_and_alpha_grads(|x| model.forward(x).unwrap(), &ts_alphas, &x, &y);
        let (b, gb) = loss_and_alpha_grads(|x| net.forward_t(x, false), &rs_alphas, &x, &y);
        assert_close(&a, &b, 0.0, 1e-5, &format!("{what}: approximate logits"));
        for ((n, ga), gb) in ts_alphas.iter().map(|(n, _)| n).zip(&ga).zip(&gb) {
            assert!(
                (ga - gb).abs() <= 1e-3 * (1.0 + gb.abs()),
                "{what}: approximate {n} gradient {ga} vs {gb}"
            );
        }
        let no_grad = tch::no_grad(|| model.forward(&x).unwrap());
        assert_close(&no_grad, &a, 0.0, 1e-5, &format!("{what}: approximate, without gradients"));
        let quantized = tch::no_grad(|| {
            model.set_multiplier(None).unwrap();
            model.forward(&x).unwrap()
        });
        assert!((&quantized - &no_grad).abs().max().double_value(&[]) > 1e-2, "{what}: the multiplier shows");
    }
}

#[test]
fn alpha_gradients_match_finite_differences_of_the_unrounded_quantizer() {
    let m = common::embedded_digits();
    let x = normalize(&m.test_images.narrow(0, 0, 16), 0.0, 1.0, Device::Cpu).unwrap().to_kind(Kind::Double);
    for name in ["resnet_scripted", "resnet_traced"] {
        let mut model = ScriptModel::load(rewrite_fixture(name), Device::Cpu).unwrap();
        let spec = QuantSpec { rounded: false, x_bits: Some(4), init_alpha: 0.7123, ..Default::default() };
        // Not a multiple of 1/255: no input pixel sits exactly on the kink at alpha.
        model.quantize_layers(&RewriteConfig { default: spec, ..Default::default() }).unwrap();
        model.set_kind(Kind::Double).unwrap();
        tch::manual_seed(3);
        let w = Tensor::randn([16, 10], (Kind::Double, Device::Cpu));
        let objective = |model: &ScriptModel| (model.forward(&x).unwrap() * &w).sum(Kind::Double);
        let alphas: Vec<(String, Tensor)> = model
            .parameters()
            .unwrap()
            .into_iter()
            .filter(|(n, _)| n.ends_with("x_quantizer.alpha"))
            .collect();
        assert_eq!(alphas.len(), 9);
        for (_, a) in &alphas {
            let _ = a.set_requires_grad(true);
        }
        objective(&model).backward();
        for (n, a) in &alphas {
            let g = a.grad().double_value(&[0]);
            let h = 1e-6;
            let at = |v: f64| {
                let _ = tch::no_grad(|| a.shallow_clone().fill_(v));
                objective(&model).double_value(&[])
            };
            let a0 = a.double_value(&[0]);
            let fd = (at(a0 + h) - at(a0 - h)) / (2.0 * h);
            at(a0);
            assert!(
                (g - fd).abs() <= 1e-4 * (1.0 + fd.abs()),
                "{name} {n}: autograd {g} vs finite difference {fd}"
            );
        }
    }
}

#[test]
fn calibrated_8_bit_and_finetuned_4_bit_models_keep_their_accuracy() {
    let m = common::embedded_digits();
    let tx = normalize(&m.train_images, 0.0, 1.0, Device::Cpu).unwrap();
    let vx = normalize(&m.test_images, 0.0, 1.0, Device::Cpu).unwrap();
    let mut q8 = ScriptModel::load(rewrite_fixture("resnet_scripted"), Device::Cpu).unwrap();
    q8.quantize_layers(&RewriteConfig::default()).unwrap();
    let uncalibrated = q8.accuracy(&vx, &m.test_labels, 500).unwrap();
    q8.calibrate(&tx, 8, 64).unwrap();
    let calibrated = q8.accuracy(&vx, &m.test_labels, 500).unwrap();
    let float = float_accuracy("resnet_scripted");
    eprintln!("resnet 8-bit: float {float:.4}, alpha 2.2 {uncalibrated:.4}, calibrated {calibrated:.4}");
    assert!(calibrated >= float - 0.005, "8-bit calibrated {calibrated} vs float {float}");
    assert!(calibrated > uncalibrated, "calibration did not help: {calibrated} vs {uncalibrated}");

    let mut q4 = ScriptModel::load(rewrite_fixture("resnet_traced"), Device::Cpu).unwrap();
    let spec = QuantSpec { x_bits: Some(4), w_bits: Some(4), per_channel: true, ..Default::default() };
    q4.quantize_layers(&RewriteConfig { default: spec, ..Default::default() }).unwrap();
    q4.calibrate(&tx, 8, 64).unwrap();
    let before = q4.accuracy(&vx, &m.test_labels, 500).unwrap();
    let alphas_before = q4.alphas().unwrap();
    q4.finetune(&tx, &m.train_labels, FinetuneConfig { epochs: 1, lr: 1e-3, ..Default::default() }).unwrap();
    let after = q4.accuracy(&vx, &m.test_labels, 500).unwrap();
    let float = float_accuracy("resnet_traced");
    eprintln!("resnet 4-bit per channel: float {float:.4}, calibrated {before:.4}, after 1 epoch {after:.4}");
    assert!(after >= float - 0.015, "4-bit fine-tuned {after} vs float {float}");
    let moved = q4.alphas().unwrap().iter().zip(&alphas_before).filter(|(a, b)| a.1 != b.1).count();
    assert_eq!(moved, 9, "every input alpha learns");
}

/// `quantize_layers` rewrites a clone with fresh classes and methods: a model whose forward
/// already ran (and was optimized by libtorch's executor, calls inlined) gets the rewritten
/// layers all the same, exactly as a freshly loaded one.
#[test]
fn a_model_that_already_ran_is_rewritten_like_a_fresh_one() {
    let m = common::embedded_digits();
    let x = normalize(&m.test_images.narrow(0, 0, 32), 0.0, 1.0, Device::Cpu).unwrap();
    for name in ["lenet_traced", "mlp_scripted"] {
        let mut warm = ScriptModel::load(ts_fixture(name), Device::Cpu).unwrap();
        // Three runs: libtorch's profiling executor optimizes the graph on a later one.
        let mut float = Tensor::new();
        for _ in 0..3 {
            float = tch::no_grad(|| warm.forward(&x).unwrap());
        }
        warm.quantize_layers(&RewriteConfig {
            default: QuantSpec { x_bits: Some(3), ..Default::default() },
            ..Default::default()
        })
        .unwrap();
        let mut fresh = ScriptModel::load(ts_fixture(name), Device::Cpu).unwrap();
        fresh
            .quantize_layers(&RewriteConfig {
                default: QuantSpec { x_bits: Some(3), ..Default::default() },
                ..Default::default()
            })
            .unwrap();
        let (a, b) = tch::no_grad(|| (warm.forward(&x).unwrap(), fresh.forward(&x).unwrap()));
        assert!(a.equal(&b), "{name}: the warm model's rewrite differs from a fresh one's");
        let moved = (&a - &float).abs().max().double_value(&[]);
        assert!(moved > 1e-3, "{name}: 3-bit inputs changed nothing ({moved}): the old layers still run");
    }
}

/// Batches are made on a background thread while the previous step trains; every random
/// number is drawn on the training thread, so a seed still fixes the result bit for bit.
#[test]
fn finetuning_with_background_batches_is_reproducible() {
    let m = common::embedded_digits();
    let tx = normalize(&m.train_images.narrow(0, 0, 640), 0.0, 1.0, Device::Cpu).unwrap();
    let ty = m.train_labels.narrow(0, 0, 640);
    let run = |seed: i64| {
        let mut model = ScriptModel::load(ts_fixture("lenet_traced"), Device::Cpu).unwrap();
        model.quantize_layers(&RewriteConfig::default()).unwrap();
        let ft = FinetuneConfig { epochs: 2, lr: 1e-3, batch_size: 50, seed, augment_pad: 2 };
        model.finetune(&tx, &ty, ft).unwrap();
        model.parameters().unwrap()
    };
    let (a, b, c) = (run(5), run(5), run(6));
    for (((name, a), (_, b)), (_, c)) in a.iter().zip(&b).zip(&c) {
        assert!(a.equal(b), "{name} differs between two runs of one seed");
        // (conv1's alpha stays at 2.2 above every pixel: it gets no gradient under any seed.)
        assert!(!name.ends_with("weight") || !a.equal(c), "{name} is the same under another seed");
    }
}

#[test]
fn what_the_rewrite_cannot_do_is_reported_or_refused() {
    let mixed = rewrite_fixture("mixed_scripted");
    let mut model = ScriptModel::load(&mixed, Device::Cpu).unwrap();
    let report = model.quantize_layers(&RewriteConfig::default()).unwrap();
    let names: Vec<(&str, usize)> = report.layers.iter().map(|l| (l.name.as_str(), l.calls)).collect();
    assert_eq!(names, [("hidden", 1), ("twice", 2)]);
    assert_eq!(
        report.left_in_float,
        ["rows: Conv1d is not covered", "the top module: 1 functional aten::linear call(s) in its code"]
    );
    let strict = RewriteConfig { strict: true, ..Default::default() };
    let e = ScriptModel::load(&mixed, Device::Cpu).unwrap().quantize_layers(&strict).unwrap_err();
    assert_eq!(
        e.to_string(),
        "strict rewrite refused: 2 would stay in float: rows: Conv1d is not covered; \
         the top module: 1 functional aten::linear call(s) in its code"
    );
    assert!(matches!(e, torchapprox::Error::LeftInFloat { layers } if layers.len() == 2));
    let e = model.quantize_layers(&RewriteConfig::default()).unwrap_err().to_string();
    assert!(
        e.starts_with("the model was quantized by this rewrite before (hidden.x_quantizer is a quantizer)"),
        "{e}"
    );

    let scripted = rewrite_fixture("resnet_scripted");
    let load = || ScriptModel::load(&scripted, Device::Cpu).unwrap();
    let minmax = QuantSpec { x_kind: QuantizerKind::MinMax, ..Default::default() };
    let e = load()
        .quantize_layers(&RewriteConfig {
            overrides: vec![("layer1.1.conv1".into(), minmax)],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("layers layer1.0.conv1 and layer1.1.conv1 share the TorchScript class"), "{e}");
    let e = load()
        .quantize_layers(&RewriteConfig { overrides: vec![("layer9".into(), minmax)], ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("unknown layer \"layer9\": the model's layers are stem.0, layer1.0.conv1"), "{e}");
    let bad_bits = QuantSpec { w_bits: Some(17), ..Default::default() };
    let e = load().quantize_layers(&RewriteConfig { default: bad_bits, ..Default::default() }).unwrap_err();
    assert_eq!(e.to_string(), "bitwidth 17 is out of range: quantizers support 2..=16 bits");
    let e = ScriptModel::load(ts_fixture("no_weights"), Device::Cpu)
        .unwrap()
        .quantize_layers(&RewriteConfig::default())
        .unwrap_err()
        .to_string();
    assert_eq!(e, "no Linear or Conv2d layer to quantize");
    let mut plain = load();
    let e = plain.calibrate(&Tensor::zeros([4, 1, 28, 28], (Kind::Float, Device::Cpu)), 1, 4).unwrap_err();
    assert!(
        e.to_string().ends_with(
            "resnet_scripted.pt: no PACT or running MinMax input quantizers to calibrate: call quantize_layers first"
        ),
        "{e}"
    );
    // Callers can tell failures apart by the error's variant and fields, not its text.
    assert!(matches!(e, torchapprox::Error::NothingToDo { what, .. } if what.starts_with("no PACT")));
}

#[test]
fn quantize_torchscript_cli_rewrites_calibrates_and_reports_each_layer() {
    let tmp = TempDir::new("rw-cli");
    let bin = common::example_bin("quantize_torchscript");
    let model = rewrite_fixture("resnet_scripted");
    let out = tmp.0.join("q.pt");
    let run = |args: &[&str]| Command::new(&bin).args(args).env_remove("RUST_BACKTRACE").output().unwrap();
    let o = run(&[
        "--model",
        model.to_str().unwrap(),
        "--x-quant",
        "pact",
        "--calibrate",
        "4",
        "--bits",
        "8",
        "--layer",
        "fc=minmax:8,minmax:6",
        "--json",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (float, quantized) =
        (report["float_accuracy"].as_f64().unwrap(), report["quantized_accuracy"].as_f64().unwrap());
    assert!(quantized >= float - 0.005, "{report}");
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 9);
    assert_eq!((layers[0]["name"].as_str(), layers[0]["x_quant"].as_str()), (Some("stem.0"), Some("pact")));
    assert!(layers[0]["x_alpha"].as_f64().unwrap() != 2.2);
    assert_eq!((layers[8]["x_quant"].as_str(), layers[8]["w_bits"].as_u64()), (Some("minmax"), Some(6)));
    assert!(layers[8]["x_alpha"].is_null());
    // PyTorch measures the saved file as Rust did.
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/checks/torchscript_accuracy.py");
    let o = Command::new(common::python()).arg(script).arg(&out).output().unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    let torch_acc: f64 = said.split_whitespace().last().unwrap().parse().unwrap();
    assert!((torch_acc - quantized).abs() < 1e-4, "PyTorch {torch_acc} vs Rust {quantized}");
    for (args, needle) in [
        (vec!["--x-quant", "pact", "--layer", "nope=pact,minmax"], "unknown layer \"nope\""),
        (vec!["--calibrate", "2"], "--calibrate, --x-bits, --w-bits and --strict need --x-quant"),
        (vec!["--x-quant", "pact", "--x-bits", "1"], "bitwidth 1 is out of range"),
        (vec!["--mode", "approx", "--multiplier", "exact"], "--mode approx needs --x-quant pact or minmax"),
        (
            vec!["--x-quant", "pact", "--multiplier", "exact"],
            "--multiplier and --layer-multiplier apply to --mode approx",
        ),
        (vec!["--x-quant", "pact", "--mode", "approx"], "--mode approx needs --multiplier SPEC"),
        (
            vec!["--x-quant", "pact", "--mode", "approx", "--multiplier", "wallace"],
            "unknown multiplier \"wallace\"",
        ),
        (
            vec!["--x-quant", "pact", "--bits", "12", "--mode", "approx", "--multiplier", "exact"],
            "approximate mode reads 8-bit tables",
        ),
    ] {
        let o = run(&[&["--model", model.to_str().unwrap(), "--device", "cpu"][..], &args[..]].concat());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
}

#[test]
fn quantize_torchscript_cli_runs_approximate_mode_and_retrains_to_the_multiplier() {
    let bin = common::example_bin("quantize_torchscript");
    // The MLP: its table products are cheap enough for an unoptimized test build.
    let model = ts_fixture("mlp_scripted");
    let run = |extra: &[&str]| {
        let mut args =
            vec!["--model", model.to_str().unwrap(), "--x-quant", "pact", "--calibrate", "4", "--json"];
        args.extend_from_slice(extra);
        let o = Command::new(&bin).args(&args).output().unwrap();
        assert!(o.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let accuracy = |r: &serde_json::Value| r["quantized_accuracy"].as_f64().unwrap();
    let quantized = run(&[]);
    let exact = run(&["--mode", "approx", "--multiplier", "exact"]);
    assert_eq!(exact["multipliers"].as_array().unwrap().len(), 2, "{exact}");
    assert!((accuracy(&exact) - accuracy(&quantized)).abs() < 1e-9, "the exact table is Quantized mode");
    let mixed = run(&["--mode", "approx", "--multiplier", "mul8s_1L12", "--layer-multiplier", "fc2=exact"]);
    let names: Vec<(&str, &str)> = mixed["multipliers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["layer"].as_str().unwrap(), m["multiplier"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [("fc1", "mul8s_1L12"), ("fc2", "exact")], "{mixed}");
    // EvoApprox's cheapest signed multiplier everywhere, then one epoch retrained to it.
    let rough = run(&["--mode", "approx", "--multiplier", "mul8s_1L12"]);
    let retrained = run(&[
        "--mode",
        "approx",
        "--multiplier",
        "mul8s_1L12",
        "--finetune-epochs",
        "1",
        "--finetune-lr",
        "1e-3",
    ]);
    eprintln!(
        "quantized {:.4}, mul8s_1L12 {:.4}, retrained {:.4}",
        accuracy(&quantized),
        accuracy(&rough),
        accuracy(&retrained)
    );
    assert!(accuracy(&rough) < 0.5, "mul8s_1L12 everywhere breaks the float-trained MLP: {rough}");
    assert!(accuracy(&retrained) > 0.6, "retraining to the multiplier recovers: {retrained}");
}

// Issue 20 item 3 (part): PACT alphas are trainable parameters after the rewrite, after a
// save and reload in Rust, and in PyTorch's torch.jit.load.
#[test]
fn rewritten_alphas_require_grad_everywhere() {
    let tmp = common::TempDir::new("alpha-grad");
    let spec = QuantSpec { w_kind: QuantizerKind::Pact, ..Default::default() };
    let mut model = ScriptModel::load(rewrite_fixture("resnet_scripted"), Device::Cpu).unwrap();
    model.quantize_layers(&RewriteConfig { default: spec, ..Default::default() }).unwrap();
    let alphas = |m: &ScriptModel| -> Vec<(String, bool)> {
        m.parameters()
            .unwrap()
            .into_iter()
            .filter(|(n, _)| n.ends_with(".alpha"))
            .map(|(n, t)| (n, t.requires_grad()))
            .collect()
    };
    let before = alphas(&model);
    assert_eq!(before.len(), 18, "an input and a weight alpha per layer: {before:?}");
    assert!(before.iter().all(|(_, g)| *g), "{before:?}");
    let out = tmp.0.join("q.pt");
    model.save(&out).unwrap();
    let reloaded = ScriptModel::load(&out, Device::Cpu).unwrap();
    assert!(alphas(&reloaded).iter().all(|(_, g)| *g), "{:?}", alphas(&reloaded));
    let script = "import sys, torch\nm = torch.jit.load(sys.argv[1])\nbad = [n for n, p in m.named_parameters() if n.endswith('.alpha') and not p.requires_grad]\nprint(len([n for n, _ in m.named_parameters() if n.endswith('.alpha')]), bad)\nsys.exit(1 if bad else 0)\n";
    let o = std::process::Command::new(common::python()).args(["-c", script]).arg(&out).output().unwrap();
    assert!(
        o.status.success(),
        "{} {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("18 []"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn running_minmax_inputs_calibrate_train_and_make_predictions_independent_of_the_batch() {
    let tmp = TempDir::new("rw-running");
    let m = common::embedded_digits();
    let x = normalize(&m.test_images.narrow(0, 0, 64), 0.0, 1.0, Device::Cpu).unwrap();
    let spec = |x_range| QuantSpec { x_kind: QuantizerKind::MinMax, x_range, ..Default::default() };
    let running = torchapprox::quantizers::RangeMode::Running { momentum: 0.9 };
    let load = || ScriptModel::load(rewrite_fixture("resnet_scripted"), Device::Cpu).unwrap();
    let running_max = |model: &ScriptModel, layer: &str| {
        let state = model.state_dict().unwrap();
        let name = format!("{layer}.x_quantizer.running_max");
        state.into_iter().find(|(n, _)| n == &name).unwrap().1.double_value(&[0])
    };
    // With each call's own range, a digit's logits depend on the rest of its batch.
    let mut batch = load();
    batch
        .quantize_layers(&RewriteConfig { default: spec(Default::default()), ..Default::default() })
        .unwrap();
    let alone = tch::no_grad(|| batch.forward(&x.narrow(0, 0, 1)).unwrap());
    let together = tch::no_grad(|| batch.forward(&x).unwrap()).narrow(0, 0, 1);
    assert!((alone - together).abs().max().double_value(&[]) > 1e-3, "batch ranges should differ");

    let mut model = load();
    model.quantize_layers(&RewriteConfig { default: spec(running), ..Default::default() }).unwrap();
    assert_eq!(running_max(&model, "stem.0"), 0.0, "0 before calibration");
    let ranges = model.calibrate(&x, 2, 32).unwrap();
    assert_eq!(ranges.len(), 9);
    // The stem's input is the digit itself: its range is the largest pixel.
    let pixel_max = x.abs().max().double_value(&[]);
    assert_eq!(ranges[0], ("stem.0".to_string(), pixel_max));
    assert_eq!(running_max(&model, "stem.0"), pixel_max);
    let alone = tch::no_grad(|| model.forward(&x.narrow(0, 0, 1)).unwrap());
    let together = tch::no_grad(|| model.forward(&x).unwrap()).narrow(0, 0, 1);
    assert_close(&alone, &together, 1e-4, 1e-4, "running ranges: a digit alone and in its batch");

    // Training moves the range by momentum: one step on half-bright digits.
    let ft = FinetuneConfig { epochs: 1, batch_size: 64, lr: 1e-6, ..Default::default() };
    let labels = m.test_labels.narrow(0, 0, 64);
    model.finetune(&(&x * 0.5), &labels, ft).unwrap();
    let expected = 0.9 * pixel_max + 0.1 * 0.5 * pixel_max;
    assert!(
        (running_max(&model, "stem.0") - expected).abs() < 1e-6,
        "{} vs {expected}",
        running_max(&model, "stem.0")
    );
    // The buffer travels with the file, and PyTorch computes the same logits from it.
    let y = tch::no_grad(|| model.forward(&x).unwrap());
    let out = tmp.0.join("running-q.pt");
    model.save(&out).unwrap();
    common::pytorch_agrees("torchscript_reload_check.py", &out, &x, y, "running MinMax reload");
}

// Issue 20 item 1: without gradients the rewritten layers take a shorter path and reuse
// MinMax weights quantized once per weight update; the values are the training path's.
#[test]
fn the_no_grad_path_and_its_weight_cache_give_the_training_paths_values() {
    let tmp = TempDir::new("rw-nograd");
    let m = common::embedded_digits();
    let x = normalize(&m.test_images.narrow(0, 0, 16), 0.0, 1.0, Device::Cpu).unwrap();
    let running = torchapprox::quantizers::RangeMode::Running { momentum: 0.9 };
    for (what, spec) in [
        ("pact/minmax", QuantSpec::default()),
        ("per channel", QuantSpec { per_channel: true, ..Default::default() }),
        (
            "pact weights, 4 bits",
            QuantSpec { w_kind: QuantizerKind::Pact, x_bits: Some(4), ..Default::default() },
        ),
        ("minmax batch", QuantSpec { x_kind: QuantizerKind::MinMax, ..Default::default() }),
        (
            "minmax running",
            QuantSpec { x_kind: QuantizerKind::MinMax, x_range: running, ..Default::default() },
        ),
        ("unrounded", QuantSpec { rounded: false, ..Default::default() }),
    ] {
        let mut model = ScriptModel::load(rewrite_fixture("resnet_scripted"), Device::Cpu).unwrap();
        model.quantize_layers(&RewriteConfig { default: spec, ..Default::default() }).unwrap();
        if spec.x_kind == QuantizerKind::Pact || spec.x_range == running {
            model.calibrate(&x, 1, 16).unwrap();
        }
        let with_grad = || model.forward(&x).unwrap().detach();
        let without = || tch::no_grad(|| model.forward(&x).unwrap());
        common::assert_exact(&without(), &with_grad(), what);
        common::assert_exact(&without(), &with_grad(), &format!("{what}: from the cache"));
        // Non-finite inputs take the long forms: equal values, and no NaN in any gradient.
        let bad = x.copy();
        let _ = bad.get(0).get(0).get(5).get(5).fill_(f64::INFINITY);
        let _ = bad.get(1).get(0).get(5).get(5).fill_(f64::NEG_INFINITY);
        let bad = bad.set_requires_grad(true);
        let y = model.forward(&bad).unwrap();
        common::assert_exact(
            &tch::no_grad(|| model.forward(&bad).unwrap()),
            &y.detach(),
            &format!("{what}: ±inf"),
        );
        y.sum(Kind::Float).backward();
        assert!(bool::try_from(bad.grad().isfinite().all()).unwrap(), "{what}: input gradient");
        for (n, p) in model.parameters().unwrap() {
            let g = p.grad();
            assert!(!g.defined() || bool::try_from(g.isfinite().all()).unwrap(), "{what}: {n} gradient");
        }
        // An in-place update of a weight (an optimizer step, load_state_dict) refreshes the cache.
        let before = without();
        let fc = model.parameters().unwrap().into_iter().find(|(n, _)| n == "fc.weight").unwrap().1;
        let _ = tch::no_grad(|| fc.shallow_clone().f_mul_scalar_(0.5).unwrap());
        let after = without();
        assert!((&after - &before).abs().max().double_value(&[]) > 1e-3, "{what}: the update shows");
        common::assert_exact(&after, &with_grad(), &format!("{what}: after an update"));
    }
    // The saved file carries no cached weights: it is as large after evaluation as before.
    let mut model = ScriptModel::load(rewrite_fixture("resnet_scripted"), Device::Cpu).unwrap();
    model.quantize_layers(&RewriteConfig::default()).unwrap();
    let (fresh, used) = (tmp.0.join("fresh.pt"), tmp.0.join("used.pt"));
    model.save(&fresh).unwrap();
    let _ = tch::no_grad(|| model.forward(&x).unwrap());
    model.save(&used).unwrap();
    let size = |p: &PathBuf| std::fs::metadata(p).unwrap().len() as i64;
    assert!((size(&used) - size(&fresh)).abs() < 1024, "{} vs {} bytes", size(&used), size(&fresh));
}

/// Approximate mode through the attentions of `model` (rewritten at 8 bits): the exact table
/// gives Quantized mode's output, a real multiplier moves it, and the saved file computes the
/// same products in PyTorch (gathers from each layer's table).
fn check_approx_attentions(model: &mut ScriptModel, x: &Tensor, tmp: &TempDir, what: &str) {
    let y = tch::no_grad(|| model.forward(x).unwrap());
    model.set_multiplier(Some(&Multiplier::exact())).unwrap();
    let exact_table = tch::no_grad(|| model.forward(x).unwrap());
    assert_close(&exact_table, &y, 1e-5, 1e-4, &format!("{what}: exact table"));
    model.set_multiplier(Some(&Multiplier::evoapprox("mul8s_1L2J").unwrap())).unwrap();
    let approx = tch::no_grad(|| model.forward(x).unwrap());
    assert!((&approx - &y).abs().max().double_value(&[]) > 1e-3, "{what}: the multiplier shows");
    let out = tmp.0.join(format!("{what}-approx.pt"));
    model.save(&out).unwrap();
    common::pytorch_agrees("torchscript_reload_check.py", &out, x, approx, what);
}

/// The model `scripts/checks/<script>.py` writes into `tmp` (`attention_<kind>.pt`), an
/// input `[2, 5, 16]` drawn after `seed`, and the float model's output on it.
fn attention_model(tmp: &TempDir, script: &str, seed: i64) -> (PathBuf, Tensor, Tensor) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("scripts/checks/{script}.py"));
    let o = Command::new(common::python()).arg(path).arg(&tmp.0).output().unwrap();
    assert!(o.status.success(), "{script}.py: {}", String::from_utf8_lossy(&o.stderr));
    let kind = script.strip_suffix("_attention").expect("an attention script");
    let file = tmp.0.join(format!("attention_{kind}.pt"));
    tch::manual_seed(seed);
    let x = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
    let float = tch::no_grad(|| ScriptModel::load(&file, Device::Cpu).unwrap().forward(&x).unwrap());
    (file, x, float)
}

// Issue 20 item 2: traced nn.MultiheadAttention keeps no settings in its graph. The rewrite
// recovers the head count, layout and which inputs are query, key and value by running it,
// returns the weights as the trace did (averaged or per head), handles bias-free and separate
// projections and cross-attention, and leaves an attention traced on unbatched input in float
// with its reason. At 16 bits the rewritten network computes the float one's function.
#[test]
fn traced_attentions_are_recognised_rewritten_and_reported() {
    let tmp = TempDir::new("rw-attention");
    let (file, x, float) = attention_model(&tmp, "traced_attention", 5);
    let mut model = ScriptModel::load(&file, Device::Cpu).unwrap();
    let spec = QuantSpec { bitwidth: 16, ..Default::default() };
    let report = model.quantize_layers(&RewriteConfig { default: spec, ..Default::default() }).unwrap();
    let op = |name: &str| report.layers.iter().find(|l| l.name == name).map(|l| (l.op, l.bias));
    let traced =
        |heads, weights, sources| Some(TracedAttention { heads, weights, sources, weights_first: false });
    let first =
        |heads, weights, sources| Some(TracedAttention { heads, weights, sources, weights_first: true });
    let attention =
        |batch_first, traced, separate| Some((LayerOp::Attention { batch_first, traced, separate }, true));
    assert_eq!(op("a"), attention(false, traced(4, Some(true), [0, 0, 0]), false));
    assert_eq!(
        op("b"),
        Some((
            LayerOp::Attention {
                batch_first: true,
                traced: traced(8, Some(false), [0, 0, 0]),
                separate: false
            },
            false
        ))
    );
    assert_eq!(op("c"), attention(false, traced(2, None, [0, 1, 1]), false));
    // (These two return their weights first: their callers used the weights first.)
    assert_eq!(
        op("e"),
        attention(true, first(4, Some(true), [0, 1, 2]), false),
        "{:?}",
        report.left_in_float
    );
    assert_eq!(op("f"), attention(false, first(2, Some(false), [0, 1, 2]), true));
    assert_eq!(op("fc").map(|(op, _)| op), Some(LayerOp::Linear));
    // Traced on an unbatched input: the probes' batch does not fit its graph.
    assert_eq!(report.left_in_float.len(), 1, "{:?}", report.left_in_float);
    assert!(report.left_in_float[0].starts_with("d: its traced forward "), "{:?}", report.left_in_float);
    let strict = RewriteConfig { default: spec, strict: true, ..Default::default() };
    match ScriptModel::load(&file, Device::Cpu).unwrap().quantize_layers(&strict) {
        Err(torchapprox::Error::LeftInFloat { layers }) => assert_eq!(layers, report.left_in_float),
        other => panic!("strict: {other:?}"),
    }
    model.calibrate(&x, 1, 2).unwrap();
    let y = tch::no_grad(|| model.forward(&x).unwrap());
    assert_close(&y, &float, 1e-3, 1e-3, "16-bit traced attentions vs float");
    let out = tmp.0.join("attention-q.pt");
    model.save(&out).unwrap();
    common::pytorch_agrees("torchscript_reload_check.py", &out, &x, y, "traced attentions");
    let mut model = ScriptModel::load(&file, Device::Cpu).unwrap();
    model.quantize_layers(&RewriteConfig::default()).unwrap();
    model.calibrate(&x, 1, 2).unwrap();
    check_approx_attentions(&mut model, &x, &tmp, "traced");
}

// Issue 20 item 2: a scripted nn.MultiheadAttention with separate q/k/v weights (keys and
// values of other widths than the embedding) has each weight quantized on its own (PACT
// weights get an alpha each), the packed bias split by offset; at 16 bits it computes the
// float network's function, at 4 bits the quantization shows, and PyTorch reloads it.
#[test]
fn separate_projection_attentions_get_a_quantizer_per_weight() {
    let tmp = TempDir::new("rw-separate");
    let (file, x, float) = attention_model(&tmp, "separate_attention", 6);
    let rewrite = |spec: QuantSpec| {
        let mut model = ScriptModel::load(&file, Device::Cpu).unwrap();
        let config = RewriteConfig { default: spec, strict: true, ..Default::default() };
        let report = model.quantize_layers(&config).unwrap();
        let op = |name: &str| report.layers.iter().find(|l| l.name == name).map(|l| (l.op, l.bias));
        for (name, batch_first) in [("a", false), ("b", true)] {
            let expected = LayerOp::Attention { batch_first, traced: None, separate: true };
            assert_eq!(op(name), Some((expected, true)), "{name}");
        }
        model.calibrate(&x, 1, 2).unwrap();
        model
    };
    for (w_kind, per_channel) in [(QuantizerKind::MinMax, true), (QuantizerKind::Pact, false)] {
        let what = format!("{w_kind} weights, per channel {per_channel}");
        let model = rewrite(QuantSpec { bitwidth: 16, w_kind, per_channel, ..Default::default() });
        let y = model.forward(&x).unwrap();
        assert_close(&y.detach(), &float, 1e-3, 1e-3, &format!("16 bits, {what}"));
        if w_kind == QuantizerKind::Pact {
            // One trainable alpha per weight, each reached by the loss.
            y.sum(Kind::Float).backward();
            let params = model.parameters().unwrap();
            for layer in ["a", "b"] {
                for q in ["w_quantizer", "k_w_quantizer", "v_w_quantizer", "out_proj.w_quantizer"] {
                    let name = format!("{layer}.{q}.alpha");
                    let alpha =
                        &params.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("{name}")).1;
                    assert!(alpha.requires_grad(), "{name}");
                    let g = alpha.grad();
                    assert!(g.defined() && bool::try_from(g.isfinite().all()).unwrap(), "{name}: {g:?}");
                }
            }
        }
        let out = tmp.0.join(format!("separate-{w_kind}.pt"));
        model.save(&out).unwrap();
        let y = tch::no_grad(|| model.forward(&x).unwrap());
        common::pytorch_agrees("torchscript_reload_check.py", &out, &x, y, &what);
    }
    // At 4 bits the projections are quantized: the output moves off the float one.
    let coarse =
        tch::no_grad(|| rewrite(QuantSpec { bitwidth: 4, ..Default::default() }).forward(&x).unwrap());
    let moved = (&coarse - &float).abs().max().double_value(&[]);
    assert!(moved > 1e-2, "4 bits moved the output by only {moved}");
    check_approx_attentions(&mut rewrite(QuantSpec::default()), &x, &tmp, "separate");
}

/// Scripts one small network three times in `dir` (same weights): `plain.pt` returns its
/// logits, `aux.pt` a NamedTuple `(logits, aux=None)` as torchvision's scripted Inception and
/// GoogLeNet do in evaluation, `dict.pt` a `{"logits": ...}` dict.
const AUX_OUTPUTS: &str = r#"
import sys, torch, torch.nn as nn
from typing import Dict, NamedTuple, Optional
class Outputs(NamedTuple):
    logits: torch.Tensor
    aux: Optional[torch.Tensor]
class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 26 * 26, 10)
    def body(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))
class Plain(Base):
    def forward(self, x):
        return self.body(x)
class Aux(Base):
    def forward(self, x) -> Outputs:
        return Outputs(self.body(x), None)
class AsDict(Base):
    def forward(self, x) -> Dict[str, torch.Tensor]:
        return {"logits": self.body(x)}
torch.manual_seed(0)
plain = Plain().eval()
for name, cls in [("plain", Plain), ("aux", Aux), ("dict", AsDict)]:
    m = cls().eval()
    m.load_state_dict(plain.state_dict())
    torch.jit.script(m).save(f"{sys.argv[1]}/{name}.pt")
"#;

#[test]
fn a_model_returning_a_tuple_runs_on_its_first_tensor_and_a_dict_is_one_line() {
    let tmp = TempDir::new("aux-outputs");
    // A file, not `-c`: TorchScript reads the classes' source.
    let script = tmp.0.join("make.py");
    std::fs::write(&script, AUX_OUTPUTS).unwrap();
    let o = Command::new(common::python()).arg(&script).arg(&tmp.0).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let load = |name: &str| ScriptModel::load(tmp.0.join(format!("{name}.pt")), Device::Cpu).unwrap();
    let (mut plain, mut aux) = (load("plain"), load("aux"));
    tch::manual_seed(0);
    let x = Tensor::randn([8, 1, 28, 28], (Kind::Float, Device::Cpu));
    let logits = |m: &ScriptModel| tch::no_grad(|| m.logits(&x).unwrap());
    assert_eq!(logits(&aux).size(), [8, 10]);
    assert_eq!(logits(&aux), logits(&plain), "float");
    // Rewritten, calibrated and trained alike, the two stay equal bit for bit.
    for m in [&mut plain, &mut aux] {
        let report = m.quantize_layers(&RewriteConfig { strict: true, ..Default::default() }).unwrap();
        assert_eq!(report.layers.len(), 2);
        m.calibrate(&x, 1, 8).unwrap();
        m.set_training(true).unwrap();
        // Twice the calibrated range: inputs beyond alpha give it a gradient.
        m.logits(&(&x * 2.0)).unwrap().sum(Kind::Float).backward();
        m.set_training(false).unwrap();
    }
    assert_eq!(logits(&aux), logits(&plain), "quantized");
    let grad = |m: &ScriptModel| {
        let (_, a) =
            m.parameters().unwrap().into_iter().find(|(n, _)| n == "conv.x_quantizer.alpha").unwrap();
        a.grad()
    };
    assert!(grad(&aux).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    assert_eq!(grad(&aux), grad(&plain));

    let dict = load("dict");
    let e = dict.forward(&x).unwrap_err().to_string();
    assert!(
        e.ends_with("dict.pt: the model's forward returned a dict, not a tensor (or a tuple whose first element is one)"),
        "{e}"
    );
}

// An optimizer step can take an alpha calibrated near its floor below zero (Adam moves it by
// about the learning rate); the forward uses the floor, and fine-tuning stores the floor, so
// that the model still saves.
#[test]
fn a_fine_tuned_alpha_below_its_floor_is_stored_as_the_floor_and_the_model_saves() {
    let tmp = TempDir::new("alpha-floor");
    let m = common::embedded_digits();
    let x = normalize(&m.test_images.narrow(0, 0, 64), 0.0, 1.0, Device::Cpu).unwrap();
    let mut model = ScriptModel::load(rewrite_fixture("resnet_scripted"), Device::Cpu).unwrap();
    model.quantize_layers(&RewriteConfig::default()).unwrap();
    model.calibrate(&x, 1, 64).unwrap();
    let alpha = |model: &ScriptModel| {
        let params = model.parameters().unwrap();
        params.into_iter().find(|(n, _)| n == "stem.0.x_quantizer.alpha").unwrap().1
    };
    // Where a step overshot: the forward already acts as if alpha were the floor.
    let before = tch::no_grad(|| model.forward(&x).unwrap());
    let set = |model: &ScriptModel, v: f64| {
        let _ = tch::no_grad(|| alpha(model).fill_(v));
    };
    set(&model, -1.0);
    let below = tch::no_grad(|| model.forward(&x).unwrap());
    set(&model, torchapprox::quantizers::ALPHA_MIN);
    assert_eq!(below, tch::no_grad(|| model.forward(&x).unwrap()), "-1 acts as the floor");
    assert!((&below - &before).abs().max().double_value(&[]) > 1e-3);
    set(&model, -1.0);
    let ft = FinetuneConfig { epochs: 1, batch_size: 64, lr: 1e-3, ..Default::default() };
    model.finetune(&x, &m.test_labels.narrow(0, 0, 64), ft).unwrap();
    let a = alpha(&model).double_value(&[0]);
    assert!((f64::from(1e-6_f32)..=2e-3).contains(&a), "stored alpha {a}");
    model.save(tmp.0.join("q.pt")).unwrap();
}
