//! Networks built with `approx_sequential`, with PyTorch weights and BatchNorm statistics
//! imported from TorchScript and safetensors (fixtures: scripts/fixtures/make_import_fixtures.py).

use crate::common;

use std::path::PathBuf;

use common::{assert_close, assert_exact, fixture_path, load_fixture, values, TempDir};
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};
use torchapprox::checkpoint::{load_checked, save_atomic};
use torchapprox::import::{import_safetensors, import_tensors, ImportOptions};
use torchapprox::layers::{
    approx_linear, approx_sequential, ApproxConvConfig, ApproxModule, ApproxSequential, Calibration,
    InferenceMode, QuantizerSlot, SequentialBuilder,
};
use torchapprox::quantizers::{ApproxQuantizer, QuantConfig, QuantizerKind};
use torchapprox::torchscript::ScriptModel;

/// PyTorch's `Block(c, dilation)`: relu(x + bn2(conv2(relu(bn1(conv1(x)))))), conv2 depthwise.
fn block(b: SequentialBuilder<'_>, c: i64, dilation: i64) -> SequentialBuilder<'_> {
    let conv = |padding, dilation, groups| ApproxConvConfig {
        padding,
        dilation,
        groups,
        bias: false,
        ..Default::default()
    };
    b.conv2d("conv1", c, c, 3, conv(dilation, dilation, 1))
        .batch_norm2d("bn1", c)
        .relu()
        .conv2d("conv2", c, c, 3, conv(1, 1, c))
        .batch_norm2d("bn2", c)
}

/// The fixture's ResNet rebuilt from the crate's layers, with PyTorch's names (or `conv`/`bn`
/// for the stem, to exercise renames) and `classes` outputs.
fn resnet(vs: &nn::VarStore, stem: [&str; 2], classes: i64) -> ApproxSequential {
    let stem_conv = ApproxConvConfig { padding: 1, bias: false, ..Default::default() };
    approx_sequential(vs.root())
        .seq("stem", |s| s.conv2d(stem[0], 1, 8, 3, stem_conv).batch_norm2d(stem[1], 8).relu())
        .seq("layer1", |s| {
            s.residual("0", |b| block(b, 8, 1)).relu().residual("1", |b| block(b, 8, 1)).relu()
        })
        .conv2d("down", 8, 16, 3, ApproxConvConfig { stride: 2, padding: 1, ..Default::default() })
        .relu()
        .seq("layer2", |s| s.residual("0", |b| block(b, 16, 2)).relu())
        .avg_pool2d(2)
        .flatten()
        .linear("fc", 16 * 7 * 7, classes, Default::default())
        .build()
        .unwrap()
}

fn scripted() -> PathBuf {
    fixture_path("rewrite/resnet_scripted.pt")
}

fn accuracy(net: &ApproxSequential, x: &Tensor, y: &Tensor) -> f64 {
    let logits = tch::no_grad(|| net.f_forward_t(x, false)).unwrap();
    100.0 * logits.argmax(-1, false).eq_tensor(y).to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
}

#[test]
fn a_resnet_with_batchnorm_imported_from_torchscript_or_safetensors_gives_pytorchs_logits() {
    let probe = load_fixture("import/resnet_logits.safetensors");
    let state = load_fixture("import/resnet_state.safetensors");
    let counters: Vec<&String> = state.keys().filter(|k| k.ends_with("num_batches_tracked")).collect();
    assert_eq!(counters.len(), 7, "the fixture has 7 BatchNorms");
    let cases = common::devices().into_iter().flat_map(|d| [("torchscript", d), ("safetensors", d)]);
    for (source, device) in cases {
        let vs = nn::VarStore::new(device);
        let net = resnet(&vs, ["0", "1"], 10);
        let inputs = probe["inputs"].to_device(device);
        let before = tch::no_grad(|| net.f_forward_t(&inputs, false)).unwrap();
        let report = if source == "torchscript" {
            ScriptModel::load(scripted(), device).unwrap().import_into(&vs)
        } else {
            import_safetensors(&vs, fixture_path("import/resnet_state.safetensors"), &Default::default())
        }
        .unwrap();
        let source = &format!("{source} on {device:?}");
        // Every variable, running statistics included, comes from PyTorch; the counters are
        // left, and the 9 PACT alphas keep their values (a float model has none).
        assert_eq!(report.copied.len(), state.len() - counters.len(), "{source}: {report}");
        assert_eq!(report.copied.len(), vs.variables().len() - 9, "{source}: {report}");
        assert_eq!(report.kept.len(), 9, "{source}: {report}");
        assert!(report.kept.iter().all(|(n, _)| n.ends_with("x_quantizer.alpha")), "{source}: {report}");
        assert_eq!(report.unused.len(), 7, "{source}: {report}");
        assert!(report.unused.iter().all(|(n, _)| n.ends_with("num_batches_tracked")), "{source}: {report}");
        let vars = vs.variables();
        for name in ["layer1.1.bn2.running_var", "stem.1.running_mean", "layer2.0.bn1.weight"] {
            assert_exact(&vars[name].to_device(Device::Cpu), &state[name], &format!("{source}: {name}"));
        }
        let logits = tch::no_grad(|| net.f_forward_t(&inputs, false)).unwrap().to_device(Device::Cpu);
        // cuDNN convolutions run in TF32 by default (as in PyTorch) on recent GPUs.
        let tol = if device == Device::Cpu { 1e-5 } else { 5e-3 };
        assert_close(&logits, &probe["logits"], tol, tol, source);
        let fresh = before.to_device(Device::Cpu);
        assert!(
            values(&(&fresh - &probe["logits"]).abs()).iter().any(|d| *d > 1e-2),
            "the fresh network differs"
        );
        // Evaluation leaves the statistics alone; a training step moves them (momentum 0.1).
        let _ = tch::no_grad(|| net.f_forward_t(&inputs, true)).unwrap();
        let moved = vs.variables()["stem.1.running_mean"].to_device(Device::Cpu);
        assert!(!values(&(&moved - &state["stem.1.running_mean"]).abs()).iter().all(|d| *d == 0.0));
    }
}

#[test]
fn a_network_trained_in_rust_loads_back_into_pytorchs_own_class() {
    // Import PyTorch's weights, train a few float steps here (weights and BatchNorm
    // statistics move), save, and let PyTorch's ResNet class load the file.
    let vs = nn::VarStore::new(Device::Cpu);
    let net = resnet(&vs, ["0", "1"], 10);
    ScriptModel::load(scripted(), Device::Cpu).unwrap().import_into(&vs).unwrap();
    let (x, y) = common::embedded_test_set();
    let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
    for s in 0..3 {
        let loss = net
            .f_forward_t(&x.narrow(0, 32 * s, 32), true)
            .unwrap()
            .cross_entropy_for_logits(&y.narrow(0, 32 * s, 32));
        opt.backward_step(&loss);
    }
    let state = load_fixture("import/resnet_state.safetensors");
    let moved =
        values(&(&vs.variables()["layer1.0.bn1.running_var"] - &state["layer1.0.bn1.running_var"]).abs());
    assert!(moved.iter().any(|d| *d > 1e-4), "training moved the statistics");
    let tmp = TempDir::new("to-pytorch");
    let file = tmp.0.join("resnet.safetensors");
    save_atomic(&vs, &file).unwrap();
    let probe = x.narrow(0, 1000, 64);
    let logits = tch::no_grad(|| net.f_forward_t(&probe, false)).unwrap();
    let said =
        common::pytorch_agrees("state_dict_reload_check.py", &file, &probe, logits, "resnet state dict");
    // PyTorch fills in BatchNorm's missing counters itself; the 9 PACT alphas are ours.
    assert!(said.contains("0 counters missing, 9 quantizer entries ignored"), "{said}");
}

#[test]
fn renames_and_partial_imports_report_what_they_skipped() {
    let path = fixture_path("import/resnet_state.safetensors");
    let stem = ImportOptions::renamed([("stem.0", "stem.conv"), ("stem.1", "stem.bn")]);

    // Without the renames: every problem in one message, and nothing copied.
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = resnet(&vs, ["conv", "bn"], 10);
    let w0 = vs.variables()["stem.conv.weight"].copy();
    let e = import_safetensors(&vs, &path, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("resnet_state.safetensors does not fit the network"), "{e}");
    assert!(e.contains("missing stem.conv.weight") && e.contains("missing stem.bn.running_var"), "{e}");
    assert!(e.contains("unused stem.0.weight (no such variable)"), "{e}");
    assert!(!e.contains("num_batches_tracked"), "counters are not problems: {e}");
    assert_exact(&vs.variables()["stem.conv.weight"], &w0, "nothing copied on error");

    // With them, the network fits exactly.
    let report = import_safetensors(&vs, &path, &stem).unwrap();
    assert_eq!(report.copied.len(), vs.variables().len() - 9, "{report}");
    let state = load_fixture("import/resnet_state.safetensors");
    assert_exact(&vs.variables()["stem.bn.running_var"], &state["stem.1.running_var"], "renamed buffer");

    // A network built under a prefix takes the whole state dict with ("", "model"), and
    // a prefixed state dict (DataParallel's `module.`) loses it with ("module", "").
    let vs = nn::VarStore::new(Device::Cpu);
    let _net =
        approx_sequential(vs.root() / "model").linear("fc", 784, 10, Default::default()).build().unwrap();
    let fc: Vec<(String, Tensor)> =
        ["fc.weight", "fc.bias"].iter().map(|n| (n.to_string(), state[*n].shallow_clone())).collect();
    let copy: Vec<(String, Tensor)> = fc.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let report = import_tensors(&vs, copy, "fc", &ImportOptions::renamed([("", "model")])).unwrap();
    assert_eq!(report.copied, ["model.fc.bias", "model.fc.weight"], "{report}");
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = approx_sequential(vs.root()).linear("fc", 784, 10, Default::default()).build().unwrap();
    let prefixed: Vec<(String, Tensor)> =
        fc.iter().map(|(n, t)| (format!("module.{n}"), t.shallow_clone())).collect();
    let report = import_tensors(&vs, prefixed, "module", &ImportOptions::renamed([("module", "")])).unwrap();
    assert_eq!(report.copied, ["fc.bias", "fc.weight"], "{report}");
    assert_exact(&vs.variables()["fc.weight"], &state["fc.weight"], "unprefixed");

    // A new 5-class head: strict refuses with the shapes, partial copies the rest.
    let vs = nn::VarStore::new(Device::Cpu);
    let net = resnet(&vs, ["conv", "bn"], 5);
    let head = vs.variables()["fc.weight"].copy();
    let err = import_safetensors(&vs, &path, &stem).unwrap_err();
    let e = err.to_string();
    assert!(e.contains("fc.weight has shape [10, 784], the network needs [5, 784]"), "{e}");
    // The same problem as data a caller can match on.
    match &err {
        torchapprox::Error::Import { problems, .. } => assert_eq!(
            problems,
            &[
                torchapprox::Mismatch::Shape { source: "fc.bias".into(), got: vec![10], want: vec![5] },
                torchapprox::Mismatch::Shape {
                    source: "fc.weight".into(),
                    got: vec![10, 784],
                    want: vec![5, 784]
                },
            ]
        ),
        other => panic!("expected Error::Import, got {other:?}"),
    }
    let partial = ImportOptions { partial: true, ..stem.clone() };
    let report = import_safetensors(&vs, &path, &partial).unwrap();
    let kept: Vec<&(String, String)> = report.kept.iter().filter(|(n, _)| !n.contains("quantizer")).collect();
    assert_eq!(
        kept.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["fc.bias", "fc.weight"],
        "{report}"
    );
    assert!(kept[1].1.contains("has shape [10, 784], the network needs [5, 784]"), "{report}");
    assert_eq!(report.copied.len(), vs.variables().len() - 2 - 9, "{report}");
    assert_exact(&vs.variables()["fc.weight"], &head, "the head keeps its initial weights");
    assert!(report
        .to_string()
        .starts_with(&format!("copied {} variable(s); kept 11: ", report.copied.len())));
    // Everything but the head is PyTorch's; the new head gives 5 logits.
    let probe = load_fixture("import/resnet_logits.safetensors");
    assert_eq!(net.f_forward_t(&probe["inputs"], false).unwrap().size(), [64, 5]);

    // A network with extra layers the source lacks: partial keeps them, strict names them.
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = approx_sequential(vs.root()).linear("extra", 3, 3, Default::default()).build().unwrap();
    let report =
        import_safetensors(&vs, &path, &ImportOptions { partial: true, ..Default::default() }).unwrap();
    assert!(report.copied.is_empty() && report.kept.len() == 3, "{report}");
    assert_eq!(report.unused.len(), state.len(), "{report}");

    // Two source names mapped to one variable, an unreadable file, a missing one.
    let clash = ImportOptions::renamed([("stem.0", "down"), ("down", "down")]);
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = resnet(&vs, ["0", "1"], 10);
    let e = import_safetensors(&vs, &path, &clash).unwrap_err().to_string();
    assert!(e.contains("both map to down.weight"), "{e}");
    let tmp = TempDir::new("import");
    std::fs::write(tmp.0.join("bad.safetensors"), b"not a safetensors file").unwrap();
    let e =
        import_safetensors(&vs, tmp.0.join("bad.safetensors"), &Default::default()).unwrap_err().to_string();
    assert!(e.contains("bad.safetensors: not a readable .safetensors file"), "{e}");
    let e =
        import_safetensors(&vs, tmp.0.join("none.safetensors"), &Default::default()).unwrap_err().to_string();
    assert!(e.ends_with("none.safetensors: no such file"), "{e}");
}

#[test]
fn the_imported_resnet_keeps_pytorchs_accuracy_and_quantizes_after_calibration() {
    let (x, y) = common::embedded_test_set();
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_path("rewrite/expected.json")).unwrap())
            .unwrap();
    let float_expected = 100.0 * exp["float_accuracy"]["resnet_scripted"].as_f64().unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let net = resnet(&vs, ["0", "1"], 10);
    ScriptModel::load(scripted(), Device::Cpu).unwrap().import_into(&vs).unwrap();
    let float = accuracy(&net, &x, &y);
    assert!((float - float_expected).abs() < 0.051, "float {float} vs PyTorch {float_expected}");

    // 8-bit PACT activations at TorchApprox's alpha = 2.2 against calibrated ones.
    net.set_mode(InferenceMode::Quantized);
    let default_alpha = accuracy(&net, &x, &y);
    let batches: Vec<Tensor> = (0..4).map(|i| x.narrow(0, 100 * i, 100)).collect();
    let ranges = net.calibrate(&batches, &|b| net.f_forward_t(b, false), Calibration::Max).unwrap();
    assert_eq!(ranges.len(), 9, "every Approx layer calibrated: {ranges:?}");
    let calibrated = accuracy(&net, &x, &y);
    eprintln!("resnet: float {float:.2}%, 8-bit alpha 2.2 {default_alpha:.2}%, calibrated {calibrated:.2}%");
    assert!(calibrated >= float - 1.0, "calibrated 8-bit {calibrated} vs float {float}");
    assert!(calibrated > default_alpha + 5.0, "calibration {calibrated} vs alpha 2.2 {default_alpha}");
}

#[test]
fn replacing_a_quantizer_keeps_varstore_names_clean_and_checkpoints_round_trip() {
    let vs = nn::VarStore::new(Device::Cpu);
    let mut net = resnet(&vs, ["0", "1"], 10);
    let n_trainable = vs.trainable_variables().len();
    let lsq = QuantConfig { bitwidth: 4, ..Default::default() };
    net.f_replace_quantizer(&vs, "layer1.0.conv2", QuantizerSlot::Input, QuantizerKind::Lsq, lsq).unwrap();
    net.f_replace_quantizer(&vs, "fc", QuantizerSlot::Weight, QuantizerKind::Pact, lsq).unwrap();
    let names = vs.variables();
    assert!(names.contains_key("layer1.0.conv2.x_quantizer.step_size"));
    assert!(!names.contains_key("layer1.0.conv2.x_quantizer.alpha"), "the old alpha is gone");
    assert!(names.contains_key("fc.w_quantizer.alpha"));
    assert!(names.keys().all(|n| !n.contains("__")), "no deduplicated names: {:?}", names.keys());
    // -1 PACT alpha, +1 LSQ step; -0 MinMax weight state, +1 PACT alpha.
    assert_eq!(vs.trainable_variables().len(), n_trainable + 1);
    let fc_w =
        net.approx_layers().into_iter().find(|(n, _)| n == "fc").unwrap().1.quant().w_quantizer().bitwidth();
    assert_eq!(fc_w, 4);

    // The new quantizers train and the checkpoint reloads into a network built the same way.
    net.set_mode(InferenceMode::Quantized);
    let probe = load_fixture("import/resnet_logits.safetensors");
    let x = probe["inputs"].narrow(0, 0, 16);
    let loss = net
        .f_forward_t(&x, true)
        .unwrap()
        .cross_entropy_for_logits(&probe["logits"].narrow(0, 0, 16).argmax(-1, false));
    loss.backward();
    let step = vs.variables()["layer1.0.conv2.x_quantizer.step_size"].grad();
    assert!(step.defined() && values(&step)[0].abs() > 0.0, "the LSQ step size gets a gradient");
    let tmp = TempDir::new("replace");
    let file = tmp.0.join("net.safetensors");
    save_atomic(&vs, &file).unwrap();
    let mut vs2 = nn::VarStore::new(Device::Cpu);
    let mut net2 = resnet(&vs2, ["0", "1"], 10);
    net2.f_replace_quantizer(&vs2, "layer1.0.conv2", QuantizerSlot::Input, QuantizerKind::Lsq, lsq).unwrap();
    net2.f_replace_quantizer(&vs2, "fc", QuantizerSlot::Weight, QuantizerKind::Pact, lsq).unwrap();
    load_checked(&mut vs2, &file).unwrap();
    net2.set_mode(InferenceMode::Quantized);
    let (a, b) = tch::no_grad(|| (net.f_forward_t(&x, false).unwrap(), net2.f_forward_t(&x, false).unwrap()));
    assert_exact(&b, &a, "reloaded network");

    // A layer that is not there, or a store the network was not built in.
    let e = net
        .f_replace_quantizer(&vs, "layer1.0.bn1", QuantizerSlot::Input, QuantizerKind::Lsq, lsq)
        .unwrap_err();
    assert_eq!(e.to_string(), "no Approx layer named \"layer1.0.bn1\" in this network");
    let other = nn::VarStore::new(Device::Cpu);
    for slot in [QuantizerSlot::Input, QuantizerSlot::Weight] {
        let e = net.f_replace_quantizer(&other, "fc", slot, QuantizerKind::Lsq, lsq).unwrap_err();
        assert!(e.to_string().starts_with("\"fc\" in this VarStore is not this layer"), "{slot:?}: {e}");
    }
    assert!(other.variables().is_empty());

    // A bad configuration changes nothing.
    let names = |vs: &nn::VarStore| {
        let mut n: Vec<String> = vs.variables().into_keys().collect();
        n.sort();
        (n, vs.trainable_variables().len())
    };
    let before = names(&vs);
    let bad = QuantConfig { bitwidth: 1, ..Default::default() };
    let e = net.f_replace_quantizer(&vs, "layer1.0.conv2", QuantizerSlot::Input, QuantizerKind::Pact, bad);
    assert!(e.unwrap_err().to_string().contains("bitwidth 1 is out of range"));
    assert_eq!(names(&vs), before);

    // One layer's quantizer cannot be put under another layer's name (MinMax weights have no
    // variable to tell them apart, the weight does).
    let vs = nn::VarStore::new(Device::Cpu);
    let mut fc = approx_linear(vs.root() / "fc", 4, 2, Default::default());
    let _fc2 = approx_linear(vs.root() / "fc2", 4, 2, Default::default());
    let e =
        fc.quant.f_replace_quantizer(&vs, "fc2", QuantizerSlot::Weight, QuantizerKind::Pact, lsq, &fc.weight);
    assert!(e.unwrap_err().to_string().starts_with("\"fc2\" in this VarStore is not this layer"));

    // The new variables stay in the old ones' optimizer group.
    let mut g = approx_linear(vs.root().set_group(3) / "g", 4, 2, Default::default());
    g.quant.f_replace_quantizer(&vs, "g", QuantizerSlot::Input, QuantizerKind::Lsq, lsq, &g.weight).unwrap();
    let step = vs.variables()["g.x_quantizer.step_size"].shallow_clone();
    let vars = vs.variables_.lock().unwrap();
    let var = vars.trainable_variables.iter().find(|v| v.tensor.is_set_to(&step)).unwrap();
    assert_eq!(var.group, 3);
}

#[test]
fn sequential_networks_refuse_bad_structure_and_inputs_with_the_layers_name() {
    let vs = nn::VarStore::new(Device::Cpu);
    let e = approx_sequential(vs.root() / "net")
        .linear("fc", 4, 4, Default::default())
        .relu()
        .linear("fc", 4, 2, Default::default())
        .build()
        .unwrap_err();
    assert_eq!(e.to_string(), "net.fc: the name is used twice in one sequence: give each layer its own");
    let e = approx_sequential(vs.root())
        .seq("a", |s| s.linear("b.c", 1, 1, Default::default()))
        .build()
        .unwrap_err();
    assert_eq!(e.to_string(), "a.b.c: layer name \"b.c\" must be non-empty and hold no '.'");
    let e = approx_sequential(vs.root()).dropout(1.5).build().unwrap_err();
    assert_eq!(e.to_string(), "dropout probability must be in [0, 1), got 1.5");
    let bad_conv = ApproxConvConfig { groups: 3, ..Default::default() };
    let e = approx_sequential(vs.root()).conv2d("c", 4, 4, 3, bad_conv).build().unwrap_err();
    assert!(e.to_string().starts_with("c: groups must be"), "{e}");

    let vs = nn::VarStore::new(Device::Cpu);
    let net = approx_sequential(vs.root())
        .seq("body", |s| {
            s.conv2d("conv", 1, 4, 3, Default::default())
                .batch_norm2d("bn", 4)
                .residual("res", |r| r.conv2d("shrink", 4, 4, 3, Default::default()))
        })
        .build()
        .unwrap();
    let x = Tensor::rand([2, 1, 12, 12], (Kind::Float, Device::Cpu));
    let e = net.f_forward_t(&x, false).unwrap_err().to_string();
    assert_eq!(e, "body.res: residual block's body output: expected shape the shortcut's shape [2, 4, 10, 10], got [2, 4, 8, 8]");
    let e = net.f_forward_t(&Tensor::rand([2, 3, 12, 12], (Kind::Float, Device::Cpu)), false).unwrap_err();
    assert!(
        e.to_string().starts_with("body.conv: libtorch: Given groups=1, weight of size [4, 1, 3, 3]"),
        "{e}"
    );
    let e = net.f_forward_t(&Tensor::new(), false).unwrap_err().to_string();
    assert!(e.starts_with("network input is an undefined tensor"), "{e}");

    // A BatchNorm of the wrong width names itself rather than failing inside libtorch.
    let vs = nn::VarStore::new(Device::Cpu);
    let net = approx_sequential(vs.root()).batch_norm2d("bn", 3).build().unwrap();
    let e = net.f_forward_t(&Tensor::rand([2, 4, 5, 5], (Kind::Float, Device::Cpu)), false).unwrap_err();
    assert_eq!(
        e.to_string(),
        "bn: BatchNorm input: expected shape [N, 3, ...] with 4 dimensions, got [2, 4, 5, 5]"
    );

    // A shortcut with its own layers: ResNet's downsampling block, named as PyTorch names it.
    let vs = nn::VarStore::new(Device::Cpu);
    let net = approx_sequential(vs.root())
        .residual_with(
            "block",
            |b| b.conv2d("conv1", 2, 4, 3, ApproxConvConfig { stride: 2, padding: 1, ..Default::default() }),
            "downsample",
            |s| {
                s.conv2d("0", 2, 4, 1, ApproxConvConfig { stride: 2, ..Default::default() })
                    .batch_norm2d("1", 4)
            },
        )
        .flatten()
        .add("head", |p| nn::linear(p, 4 * 3 * 3, 2, Default::default()))
        .build()
        .unwrap();
    let names: Vec<String> = net.approx_layers().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["block.conv1", "block.downsample.0"]);
    assert!(vs.variables().contains_key("block.downsample.1.running_mean"));
    assert!(vs.variables().contains_key("head.weight"));
    let y = net.f_forward_t(&Tensor::rand([2, 2, 6, 6], (Kind::Float, Device::Cpu)), false).unwrap();
    assert_eq!(y.size(), [2, 2]);
    // tch's own modules panic on bad input; the sequence turns that into an error.
    let e = net.f_forward_t(&Tensor::rand([2, 2, 8, 8], (Kind::Float, Device::Cpu)), false).unwrap_err();
    assert!(e.to_string().starts_with("head: the module panicked: "), "{e}");
}
