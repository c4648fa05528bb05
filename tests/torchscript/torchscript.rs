//! TorchScript models exported by PyTorch (scripts/fixtures/make_torchscript_fixtures.py): accuracies equal
//! PyTorch's, saved models reload in PyTorch, import into the Rust networks, and bad input.

use crate::common;

use std::path::{Path, PathBuf};

use common::{assert_close, load_fixture};
use tch::nn::{self, ModuleT};
use tch::{Device, Tensor};
use torchapprox::data::normalize;
use torchapprox::models::Architecture;
use torchapprox::torchscript::{FinetuneConfig, PtqConfig, ScriptModel};

const MODELS: [&str; 4] = ["mlp_scripted", "lenet_traced", "nobias_scripted", "bn_dw_cnn"];

fn model_path(name: &str) -> PathBuf {
    common::fixture_path("torchscript").join(format!("{name}.pt"))
}

fn expected() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(common::fixture_path("torchscript/expected.json")).unwrap())
        .unwrap()
}

#[test]
fn float_and_quantized_accuracies_equal_pytorchs_within_two_digits() {
    let (x, y) = common::embedded_test_set();
    let exp = expected();
    let digits = exp["test_digits"].as_f64().unwrap();
    for name in MODELS {
        let e = &exp["models"][name];
        let model = ScriptModel::load(model_path(name), Device::Cpu).unwrap();
        let float = model.accuracy(&x, &y, 500).unwrap();
        assert!(
            (float - e["float"].as_f64().unwrap()).abs() * digits <= 2.0 + 1e-6,
            "{name} float: {float} vs {}",
            e["float"]
        );
        for bits in [8, 4, 2] {
            for per_channel in [false, true] {
                let key = format!("q{bits}_{}", if per_channel { "per_channel" } else { "per_tensor" });
                let model = ScriptModel::load(model_path(name), Device::Cpu).unwrap();
                let report =
                    model.quantize_weights(&PtqConfig { bits, per_channel, ..Default::default() }).unwrap();
                assert_eq!(report.len(), model.quantizable_weights().unwrap().len());
                let acc = model.accuracy(&x, &y, 500).unwrap();
                let want = e[&key].as_f64().unwrap();
                assert!(
                    (acc - want).abs() * digits <= 2.0 + 1e-6,
                    "{name} {key}: Rust {acc} vs PyTorch {want}"
                );
            }
        }
    }
}

#[test]
fn per_channel_beats_per_tensor_at_4_bits_on_the_batchnorm_cnn() {
    let (x, y) = common::embedded_test_set();
    let acc = |per_channel| {
        let m = ScriptModel::load(model_path("bn_dw_cnn"), Device::Cpu).unwrap();
        let report = m.quantize_weights(&PtqConfig { bits: 4, per_channel, ..Default::default() }).unwrap();
        (m.accuracy(&x, &y, 500).unwrap(), report)
    };
    let ((pt, rt), (pc, rc)) = (acc(false), acc(true));
    assert!(pc > pt + 0.05, "per channel {pc} vs per tensor {pt}");
    let dw = |r: &Vec<torchapprox::torchscript::LayerReport>| {
        r.iter().find(|l| l.name == "dw.weight").unwrap().clone()
    };
    assert_eq!(dw(&rt).scales.len(), 1);
    assert_eq!(dw(&rc).scales.len(), 8);
    assert!(
        dw(&rc).sqnr_db > dw(&rt).sqnr_db + 3.0,
        "per-channel SQNR {} vs {}",
        dw(&rc).sqnr_db,
        dw(&rt).sqnr_db
    );
    // BatchNorm parameters are left alone.
    let names: Vec<_> = rc.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["conv1.weight", "dw.weight", "pw.weight", "fc.weight"]);
}

#[test]
fn quantized_model_saved_by_rust_reloads_in_pytorch_with_the_same_outputs() {
    let tmp = common::TempDir::new("reload");
    let dir = tmp.0.clone();
    let probe = load_fixture("torchscript/probe.safetensors");
    let x = &probe["x"];
    for name in MODELS {
        let src = model_path(name);
        let before = std::fs::read(&src).unwrap();
        let model = ScriptModel::load(&src, Device::Cpu).unwrap();
        let cfg = PtqConfig { bits: 4, per_channel: true, overrides: vec![("fc2".into(), 8)] };
        let cfg = if name == "bn_dw_cnn" { PtqConfig { overrides: vec![], ..cfg } } else { cfg };
        let report = model.quantize_weights(&cfg).unwrap();
        if name != "bn_dw_cnn" {
            assert_eq!(report.iter().find(|l| l.name == "fc2.weight").unwrap().bits, 8);
        }
        let y = tch::no_grad(|| model.forward(x).unwrap());
        let out = dir.join(format!("{name}-w4.pt"));
        model.save(&out).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), before, "{name}: the input model was modified");
        // Rust reads its own output back...
        let back = ScriptModel::load(&out, Device::Cpu).unwrap();
        assert_close(&tch::no_grad(|| back.forward(x).unwrap()), &y, 0.0, 1e-6, name);
        // ...and so does PyTorch.
        let said = common::pytorch_agrees("torchscript_reload_check.py", &out, x, y, name);
        assert!(said.starts_with("max_abs_diff"), "{said}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with('.').then_some(n)
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn import_into_the_rust_networks_reproduces_the_torchscript_logits() {
    let probe = load_fixture("torchscript/probe.safetensors");
    for (name, arch) in [("lenet_traced", Architecture::LeNet5), ("mlp_scripted", Architecture::Mlp)] {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = arch.build(&vs.root(), |_| Default::default()).unwrap();
        let model = ScriptModel::load(model_path(name), Device::Cpu).unwrap();
        let report = model.import_into(&vs).unwrap();
        assert_eq!(report.copied.len(), 2 * arch.layer_names().len(), "{report}");
        let logits = tch::no_grad(|| net.forward_t(&probe["x"], false));
        assert_close(&logits, &probe[&format!("{name}.logits")], 1e-5, 1e-5, name);
    }
    // A model that does not fit lists every problem.
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = Architecture::LeNet5.build(&vs.root(), |_| Default::default()).unwrap();
    let e = ScriptModel::load(model_path("bn_dw_cnn"), Device::Cpu)
        .unwrap()
        .import_into(&vs)
        .unwrap_err()
        .to_string();
    assert!(e.contains("conv1.weight has shape [8, 1, 3, 3], the network needs [6, 1, 5, 5]"), "{e}");
    assert!(e.contains("missing fc3.weight") && e.contains("unused bn1.weight"), "{e}");
}

#[test]
fn weight_only_qat_finetune_beats_post_training_quantization_at_3_bits() {
    let m = common::embedded_digits();
    let train = m.subset(2000, 0);
    let tx = normalize(&train.train_images, 0.0, 1.0, Device::Cpu).unwrap();
    let (x, y) = common::embedded_test_set();
    let cfg = PtqConfig { bits: 3, ..Default::default() };
    let ptq = ScriptModel::load(model_path("lenet_traced"), Device::Cpu).unwrap();
    ptq.quantize_weights(&cfg).unwrap();
    let ptq_acc = ptq.accuracy(&x, &y, 500).unwrap();
    let mut qat = ScriptModel::load(model_path("lenet_traced"), Device::Cpu).unwrap();
    let report = qat
        .finetune_qat(
            &cfg,
            &tx,
            &train.train_labels,
            FinetuneConfig { epochs: 1, lr: 5e-4, ..Default::default() },
        )
        .unwrap();
    assert_eq!(report.len(), 5);
    let qat_acc = qat.accuracy(&x, &y, 500).unwrap();
    assert!(qat_acc > ptq_acc, "QAT {qat_acc} does not beat PTQ {ptq_acc} at 3 bits");
    // The weights really sit on the 3-bit grid: re-quantizing changes nothing.
    let again = qat.quantize_weights(&cfg).unwrap();
    assert!(again.iter().all(|l| l.max_abs_error < 1e-6), "{again:?}");
}

#[test]
fn bad_input_is_a_clear_error_and_never_touches_the_input() {
    let tmp = common::TempDir::new("bad");
    let dir = tmp.0.clone();
    let e = ScriptModel::load(dir.join("absent.pt"), Device::Cpu).unwrap_err().to_string();
    assert!(e.ends_with("absent.pt: no such file"), "{e}");
    let junk = dir.join("junk.pt");
    std::fs::write(&junk, b"this is not a zip archive").unwrap();
    let e = ScriptModel::load(&junk, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("junk.pt: not a TorchScript model (") && !e.contains('\n'), "{e}");

    let m = ScriptModel::load(model_path("no_weights"), Device::Cpu).unwrap();
    let e = m.quantize_weights(&PtqConfig::default()).unwrap_err().to_string();
    assert!(
        e.ends_with("no_weights.pt: no quantizable weights (float parameters with two or more dimensions)"),
        "{e}"
    );

    let lenet = ScriptModel::load(model_path("lenet_traced"), Device::Cpu).unwrap();
    let e = lenet.forward(&Tensor::zeros([2, 784], (tch::Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(e.contains("the model rejected an input of shape [2, 784]: ") && !e.contains('\n'), "{e}");

    let cfg = PtqConfig { overrides: vec![("fc9".into(), 4)], ..Default::default() };
    let e = lenet.quantize_weights(&cfg).unwrap_err().to_string();
    assert!(
        e.starts_with("unknown layer(s) fc9: ") && e.contains("conv1.weight, conv2.weight, fc1.weight"),
        "{e}"
    );

    let src = model_path("lenet_traced");
    let before = std::fs::read(&src).unwrap();
    let e = lenet.save(&src).unwrap_err().to_string();
    assert!(e.contains("it is the input"), "{e}");
    let e = lenet
        .save(Path::new(&format!("{}/../torchscript/lenet_traced.pt", src.parent().unwrap().display())))
        .unwrap_err();
    assert!(e.to_string().contains("it is the input"), "another spelling of the same path: {e}");
    assert_eq!(std::fs::read(&src).unwrap(), before);
    let e = lenet.save(dir.join("no/such/dir/out.pt")).unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
}
