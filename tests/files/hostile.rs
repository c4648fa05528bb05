//! Hostile files and faults (issue 8): each case once crashed, hung, took unbounded memory or
//! gave a silently wrong result; each must now succeed correctly or fail with one clear line.

use crate::common;
mod round_two;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{example_bin, fixture_path, rewrite_zip, values, TempDir};
use tch::nn;
use tch::{Device, Kind, Tensor};
use torchapprox::checkpoint::{check_destination, load_checked, save_atomic};
use torchapprox::data::{normalize, Mnist, MNIST_FILES};
use torchapprox::layers::{ApproxConv2d, ApproxLinear, QuantSpec};
use torchapprox::models::Architecture;
use torchapprox::quantizers::{
    f_minmax_quant, f_pact_quant, ApproxQuantizer, MinMaxQuant, PACTQuant, QuantConfig, Quantizer,
    QuantizerKind,
};
use torchapprox::torchscript::{FinetuneConfig, PtqConfig, ScriptModel};
use torchapprox::Error;

fn model(name: &str) -> PathBuf {
    fixture_path("torchscript").join(format!("{name}.pt"))
}

fn cli(name: &str, args: &[&str]) -> Output {
    Command::new(example_bin(name)).args(args).env_remove("RUST_BACKTRACE").output().unwrap()
}

/// Asserts a failed run that printed exactly one line, containing `needle`, and no C++ frames.
fn assert_one_line_failure(o: &Output, needle: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code().is_some(), "{what}: killed by a signal: {:?}\n{stderr}", o.status);
    assert!(!o.status.success(), "{what}: succeeded, expected an error containing {needle:?}");
    assert!(stderr.contains(needle), "{what}: expected {needle:?} in: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{what}: more than one line: {stderr}");
    assert!(!stderr.contains("frame #") && !stderr.contains("Exception raised from"), "{what}: {stderr}");
}

/// The fixture with one tensor record cut to 16 bytes.
fn short_record(tmp: &Path, name: &str, record: &str) -> PathBuf {
    let out = tmp.join(format!("{name}-short.pt"));
    rewrite_zip(&model(name), &out, |n, b| if n == record { b[..16].to_vec() } else { b });
    out
}

// 1. A short tensor record once corrupted the heap when quantized in place.
#[test]
fn short_tensor_records_are_refused_before_libtorch_reads_them() {
    let tmp = TempDir::new("short");
    for (name, record) in [
        ("mlp_scripted", "mlp_scripted/data/0"),
        ("lenet_traced", "lenet_traced/data/4"),
        ("bn_dw_cnn", "bn_dw_cnn/data/14"),
        ("nobias_scripted", "nobias_scripted/data/0"),
    ] {
        let short = short_record(&tmp.0, name, record);
        let e = ScriptModel::load(&short, Device::Cpu).unwrap_err().to_string();
        assert!(e.contains(&format!("tensor record {record} holds 16 bytes but its ")), "{name}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
    // The untouched fixtures still load: the check refuses only what is short.
    for name in ["mlp_scripted", "lenet_traced", "bn_dw_cnn", "nobias_scripted", "no_weights", "flat_output"]
    {
        ScriptModel::load(model(name), Device::Cpu).unwrap();
    }
    let short = short_record(&tmp.0, "mlp_scripted", "mlp_scripted/data/0");
    let short = short.to_str().unwrap();
    let out = tmp.0.join("q.pt");
    let o =
        cli("quantize_torchscript", &["--model", short, "--out", out.to_str().unwrap(), "--device", "cpu"]);
    assert_one_line_failure(&o, "tensor record mlp_scripted/data/0 holds 16 bytes", "quantize_torchscript");
    assert!(!out.exists());
    let o = cli("train", &["--model", "mlp", "--epochs", "0", "--init-from", short, "--device", "cpu"]);
    assert_one_line_failure(&o, "tensor record mlp_scripted/data/0 holds 16 bytes", "train --init-from");
}

// 2. An `out` overlapping `x` once gave wrong values (and a data race on large tensors).
#[test]
fn fake_quantize_out_into_memory_overlapping_the_input_equals_a_fresh_result() {
    let vs = nn::VarStore::new(Device::Cpu);
    let quantizers: Vec<Box<dyn ApproxQuantizer>> = vec![
        Box::new(MinMaxQuant::new(vs.root() / "minmax", 4)),
        Box::new(PACTQuant::new(vs.root() / "p", 4)),
    ];
    for n in [1000i64, 1 << 19] {
        for q in &quantizers {
            for shift in [1i64, -1, 0] {
                let base = common::randn(&[n + 1], 7, Device::Cpu);
                let (xs, os) = if shift >= 0 { (shift, 0) } else { (0, 1) };
                let x = base.narrow(0, xs, n);
                let expected = q.f_fake_quantize(&x.copy()).unwrap();
                let mut out = base.narrow(0, os, n);
                q.f_fake_quantize_out(&x, &mut out).unwrap();
                let what = format!("{q:?} n={n} shift={shift}");
                common::assert_exact(&out, &expected, &what);
            }
        }
    }
}

#[test]
fn every_fallible_function_refuses_undefined_tensors() {
    let vs = nn::VarStore::new(Device::Cpu);
    let x = Tensor::from_slice(&[0.5f32, -1.0, 2.0]);
    let undefined = Tensor::new;
    let is_undefined = |r: torchapprox::Result<()>, what: &str| match r {
        Err(Error::Undefined(_)) => {}
        other => panic!("{what}: expected Error::Undefined, got {other:?}"),
    };
    let quantizers: Vec<Box<dyn ApproxQuantizer>> = vec![
        Box::new(MinMaxQuant::new(vs.root() / "minmax", 8)),
        Box::new(PACTQuant::new(vs.root() / "p", 8)),
        Box::new(Quantizer::new(QuantizerKind::Pact, vs.root() / "q", 8)),
        Box::new(
            MinMaxQuant::from_config(
                vs.root() / "minmax",
                QuantConfig { per_channel: true, ..Default::default() },
            )
            .unwrap(),
        ),
    ];
    for q in &quantizers {
        is_undefined(q.f_quantize(&undefined()).map(drop), "f_quantize");
        is_undefined(q.f_quantize_scaled(&undefined()).map(drop), "f_quantize_scaled");
        is_undefined(q.f_fake_quantize(&undefined()).map(drop), "f_fake_quantize");
        is_undefined(q.f_fake_quantize_out(&undefined(), &mut x.copy()), "f_fake_quantize_out x");
        is_undefined(q.f_fake_quantize_out(&x, &mut undefined()), "f_fake_quantize_out out");
        // A wrong-shaped out is refused rather than broadcast into.
        let e = q.f_fake_quantize_out(&x, &mut Tensor::zeros([1], (Kind::Float, Device::Cpu))).unwrap_err();
        assert!(e.to_string().starts_with("out: expected shape the input's [3], got [1]"), "{e}");
    }
    is_undefined(f_minmax_quant(&undefined(), 1.0, 127).map(drop), "f_minmax_quant");
    is_undefined(f_pact_quant(&undefined(), &Tensor::from_slice(&[1.0f32]), 127).map(drop), "f_pact_quant x");
    is_undefined(f_pact_quant(&x, &undefined(), 127).map(drop), "f_pact_quant alpha");
    for arch in [Architecture::Mlp, Architecture::LeNet5] {
        let net = arch.build(&(vs.root() / arch.to_string()), |_| QuantSpec::default()).unwrap();
        is_undefined(net.f_forward_t(&undefined(), false).map(drop), "Net::f_forward_t");
    }
    let linear = ApproxLinear::f_new(vs.root() / "fc", 3, 2, Default::default()).unwrap();
    is_undefined(linear.f_forward_t(&undefined(), true).map(drop), "ApproxLinear::f_forward_t");
    let conv = ApproxConv2d::f_new(vs.root() / "conv", 1, 2, 3, Default::default()).unwrap();
    is_undefined(conv.f_forward_t(&undefined(), true).map(drop), "ApproxConv2d::f_forward_t");
}

// 3. PACT's fused training path once turned ±inf into NaN, and alpha = -inf gave NaN.
#[test]
fn pact_agrees_on_every_path_for_non_finite_inputs_and_alphas() {
    let inputs = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0, -0.3, 0.7, 2.5, -3.0, 1e30, -1e-30];
    let alphas = [2.2f32, 1.0, 1e-9, 0.0, -1.0, f32::NEG_INFINITY, f32::INFINITY, f32::NAN, 3e38];
    for &a in &alphas {
        for dequantize in [true, false] {
            let mut runs = Vec::new();
            // Contiguous (the fused kernels), strided (libtorch's path), and without gradient.
            for path in ["fused", "strided", "no_grad"] {
                let vs = nn::VarStore::new(Device::Cpu);
                let q = PACTQuant::new(vs.root(), 4);
                let _ = tch::no_grad(|| q.alpha().shallow_clone().fill_(a as f64));
                let row = || Tensor::from_slice(&inputs);
                let leaf = if path == "strided" { Tensor::stack(&[row(), row()], 1) } else { row() };
                let leaf = leaf.set_requires_grad(path != "no_grad");
                let x = if path == "strided" { leaf.select(1, 0) } else { leaf.shallow_clone() };
                assert_eq!(x.is_contiguous(), path != "strided");
                let run =
                    || if dequantize { q.f_fake_quantize(&x).unwrap() } else { q.f_quantize(&x).unwrap() };
                if path == "no_grad" {
                    runs.push((path, tch::no_grad(run), None, None));
                    continue;
                }
                let y = run();
                y.sum(Kind::Float).backward();
                let gx = if path == "strided" { leaf.grad().select(1, 0) } else { leaf.grad() };
                runs.push((path, y.detach(), Some(gx), Some(q.alpha().grad())));
            }
            let what = format!("alpha {a}, dequantize {dequantize}");
            let (_, y0, gx0, ga0) = &runs[0];
            for (path, y, gx, ga) in &runs[1..] {
                common::assert_exact(y, y0, &format!("{what}: {path} vs fused, values"));
                if let (Some(gx), Some(ga)) = (gx, ga) {
                    common::assert_exact(gx, gx0.as_ref().unwrap(), &format!("{what}: grad x"));
                    common::assert_exact(ga, ga0.as_ref().unwrap(), &format!("{what}: grad alpha"));
                }
            }
            // Saturation, and NaN only where the input is NaN.
            let ints = values(&if dequantize { y0 * pact_scale(a) } else { y0.shallow_clone() });
            let saturated = (ints[0] - 7.0).abs() < 1e-4 && (ints[1] + 7.0).abs() < 1e-4;
            assert!(saturated, "{what}: ±inf saturate to ±int_max, got {:?}", &ints[..2]);
            for (i, v) in values(y0).iter().enumerate() {
                assert_eq!(v.is_nan(), i == 2, "{what}: element {i} = {v}");
            }
            assert!(values(gx0.as_ref().unwrap()).iter().all(|g| g.is_finite()), "{what}: grad x");
            assert!(values(ga0.as_ref().unwrap()).iter().all(|g| g.is_finite()), "{what}: grad alpha");
        }
    }
}

/// The scale PACT uses for a stored alpha, as a 0-dim float32 tensor.
fn pact_scale(alpha: f32) -> Tensor {
    let eff = torchapprox::quantizers::effective_alpha(alpha as f64) as f32;
    Tensor::from(7.0f32 / eff)
}

// 4. Fine-tuning with lr = inf once wrote an all-NaN model and exited 0.
#[test]
fn finetuning_refuses_bad_learning_rates_and_restores_weights_when_it_diverges() {
    let tmp = TempDir::new("ft");
    let m = Mnist::load_dir(common::embedded_dir()).unwrap().subset(512, 100);
    let x = normalize(&m.train_images, 0.0, 1.0, Device::Cpu).unwrap();
    for lr in [f64::NAN, -1e-3, f64::INFINITY] {
        let mut sm = ScriptModel::load(model("mlp_scripted"), Device::Cpu).unwrap();
        let cfg = FinetuneConfig { lr, ..Default::default() };
        let e = sm.finetune_qat(&PtqConfig::default(), &x, &m.train_labels, cfg).unwrap_err().to_string();
        assert!(e.starts_with("fine-tuning learning rate must be finite and not negative, got "), "{e}");
    }
    let mut sm = ScriptModel::load(model("mlp_scripted"), Device::Cpu).unwrap();
    let before: Vec<Tensor> = sm.parameters().unwrap().into_iter().map(|(_, t)| t.copy()).collect();
    let cfg = FinetuneConfig { lr: 1e35, epochs: 2, ..Default::default() };
    let e = sm.finetune_qat(&PtqConfig::default(), &x, &m.train_labels, cfg).unwrap_err().to_string();
    assert!(e.starts_with("fine-tuning diverged in epoch 1 ("), "{e}");
    for ((name, after), before) in sm.parameters().unwrap().into_iter().zip(&before) {
        common::assert_exact(&after, before, &format!("{name} restored"));
    }

    let out = tmp.0.join("q.pt");
    let mlp = model("mlp_scripted");
    let args = ["--model", mlp.to_str().unwrap(), "--finetune-epochs", "1", "--device", "cpu"];
    for (lr, needle) in [
        ("--finetune-lr=inf", "must be finite and not negative, got inf"),
        ("--finetune-lr=NaN", "must be finite and not negative, got NaN"),
        ("--finetune-lr=-1", "must be finite and not negative, got -1"),
    ] {
        let o = cli("quantize_torchscript", &[&args[..], &[lr, "--out", out.to_str().unwrap()]].concat());
        assert_one_line_failure(&o, needle, lr);
        assert!(!out.exists(), "{lr}: wrote {}", out.display());
    }
}

fn idx_header(magic: u32, dims: &[u32]) -> Vec<u8> {
    let mut h = magic.to_be_bytes().to_vec();
    for d in dims {
        h.extend_from_slice(&d.to_be_bytes());
    }
    h
}

/// The four embedded files, with `replace` standing in for the one at `index`.
fn mnist_with(index: usize, replace: &[u8]) -> torchapprox::Result<Mnist> {
    let files: Vec<Vec<u8>> = MNIST_FILES
        .iter()
        .map(|n| std::fs::read(common::embedded_dir().join(format!("{n}.gz"))).unwrap())
        .collect();
    let pick = |i: usize| if i == index { replace } else { &files[i][..] };
    Mnist::from_bytes([
        (MNIST_FILES[0], pick(0)),
        (MNIST_FILES[1], pick(1)),
        (MNIST_FILES[2], pick(2)),
        (MNIST_FILES[3], pick(3)),
    ])
}

// 5. A small gzip (or a sparse file) whose payload exceeds its header once took gigabytes.
#[test]
fn payloads_beyond_the_header_are_refused_without_reading_them() {
    use std::io::Write;
    let tmp = TempDir::new("bomb");
    let baseline = common::peak_rss();
    // 1 GiB of zeros behind a header that promises 8,000 images (as many as the labels), in
    // about 1 MB of gzip.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&idx_header(0x0803, &[8000, 28, 28])).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        gz.write_all(&zeros).unwrap();
    }
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 8 << 20, "the bomb is {} bytes", bomb.len());
    let e = mnist_with(0, &bomb).unwrap_err().to_string();
    assert!(e.contains("header promises [8000, 28, 28] = 6272000 bytes of image but more follow"), "{e}");
    // A 3 GiB sparse file in a folder, read the way the trainer reads it.
    let dir = tmp.0.join("sparse");
    Mnist::load_dir(common::embedded_dir()).unwrap().subset(10, 10).save_dir(&dir).unwrap();
    let f = std::fs::File::create(dir.join(MNIST_FILES[0])).unwrap();
    (&f).write_all(&idx_header(0x0803, &[10, 28, 28])).unwrap();
    f.set_len(3 << 30).unwrap();
    let e = Mnist::load_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("= 7840 bytes of image but more follow"), "{e}");
    if let (Some(before), Some(after)) = (baseline, common::peak_rss()) {
        let grew = after.saturating_sub(before);
        assert!(grew < 256 << 20, "peak memory grew by {} MiB", grew >> 20);
    }
}

// 6. Header dimensions whose product overflows.
#[test]
fn overflowing_idx_dimensions_are_refused() {
    for dims in [[u32::MAX, u32::MAX, u32::MAX], [1 << 31, 1 << 31, 4], [1 << 31, 1 << 31, 2]] {
        let e = mnist_with(0, &idx_header(0x0803, &dims)).unwrap_err().to_string();
        assert!(e.contains("overflow: no image file is that large"), "{dims:?}: {e}");
        assert!(!e.contains('\n'));
    }
    // Large but representable: refused as truncated without allocating 2^48 bytes.
    let e = mnist_with(0, &idx_header(0x0803, &[8000, 65536, 65536])).unwrap_err().to_string();
    assert!(e.contains("= 34359738368000 bytes of image but 0 follow"), "{e}");
    // Counts that disagree are refused from the headers alone.
    let e = mnist_with(0, &idx_header(0x0803, &[65536, 65536, 65536])).unwrap_err().to_string();
    assert_eq!(e, "train split: 65536 images but 8000 labels");
    // Small headers still parse, and a short payload is named.
    let mut ok = idx_header(0x0801, &[8000]);
    ok.extend_from_slice(&[1; 7999]);
    let e = mnist_with(1, &ok).unwrap_err().to_string();
    assert!(e.contains("header promises [8000] = 8000 bytes of label but 7999 follow"), "{e}");
}

// 7. Error statistics once overflowed to an "exact grid" for weights above 1.8e19.
#[test]
fn error_statistics_of_huge_weights_equal_those_of_the_same_weights_unscaled() {
    let plain = ScriptModel::load(model("mlp_scripted"), Device::Cpu).unwrap();
    let huge = ScriptModel::load(model("mlp_scripted"), Device::Cpu).unwrap();
    // A power of two scales MinMax's grid exactly, so every ratio must stay the same.
    let k = 2f64.powi(66);
    tch::no_grad(|| {
        for (_, p) in huge.parameters().unwrap() {
            let _ = p.shallow_clone().f_mul_scalar_(k).unwrap();
        }
    });
    let (a, b) = (
        plain.quantize_weights(&PtqConfig::default()).unwrap(),
        huge.quantize_weights(&PtqConfig::default()).unwrap(),
    );
    for (a, b) in a.iter().zip(&b) {
        assert!(
            b.sqnr_db.is_finite() && (a.sqnr_db - b.sqnr_db).abs() < 1e-9,
            "{}: {} vs {}",
            a.name,
            a.sqnr_db,
            b.sqnr_db
        );
        assert!((b.max_abs_error / k - a.max_abs_error).abs() <= 1e-12 * a.max_abs_error, "{}", a.name);
    }
    // Non-finite weights are refused by name.
    let bad = ScriptModel::load(model("mlp_scripted"), Device::Cpu).unwrap();
    tch::no_grad(|| {
        let (_, w) = &bad.parameters().unwrap()[2];
        let _ = w.shallow_clone().f_view(-1).unwrap().narrow(0, 0, 3).fill_(f64::INFINITY);
    });
    let e = bad.quantize_weights(&PtqConfig::default()).unwrap_err().to_string();
    assert!(e.ends_with("weight fc2.weight holds 3 non-finite value(s) (NaN or ±inf) of 2560"), "{e}");
}

// 8. Silent wrong results.
#[test]
fn silent_wrong_results_are_refused_or_handled() {
    let tmp = TempDir::new("silent");
    let data = tmp.0.join("small");
    let full = Mnist::load_dir(common::embedded_dir()).unwrap();
    full.subset(300, 100).save_dir(&data).unwrap();
    let data = data.to_str().unwrap();
    let mlp = ["--model", "mlp", "--device", "cpu", "--data", data];

    // A batch larger than the data set is one step over all of it, not zero steps.
    let o = cli(
        "train",
        &[&mlp[..], &["--epochs", "1", "--batch-size", "9223372036854775807", "--json"]].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let loss = report["final_train_loss"].as_f64().unwrap();
    assert!(loss > 0.5 && loss.is_finite(), "loss {loss}");

    let o =
        cli("train", &[&mlp[..], &["--layer", "fc1=pact,minmax", "--layer", "fc1=minmax,minmax:4"]].concat());
    assert_one_line_failure(&o, "--layer fc1 is given twice", "train --layer twice");
    let m = model("lenet_traced");
    let o = cli(
        "quantize_torchscript",
        &["--model", m.to_str().unwrap(), "--layer", "fc1=4", "--layer", "fc1=8"],
    );
    assert_one_line_failure(&o, "--layer fc1 is given twice", "quantize_torchscript --layer twice");
    let lenet = ScriptModel::load(&m, Device::Cpu).unwrap();
    let cfg =
        PtqConfig { overrides: vec![("fc1".into(), 4), ("fc1.weight".into(), 8)], ..Default::default() };
    let e = lenet.quantize_weights(&cfg).unwrap_err().to_string();
    assert_eq!(e, "layer override \"fc1.weight\" repeats \"fc1\": give each layer once");

    // Integer and bool tensors in a checkpoint are refused, not cast.
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _net = Architecture::Mlp.build(&vs.root(), |_| QuantSpec::default()).unwrap();
    let ckpt = tmp.0.join("int.safetensors");
    let named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n.clone(), if n == "fc1.bias" { t.to_kind(Kind::Int64) } else { t }))
        .collect();
    Tensor::write_safetensors(&named, &ckpt).unwrap();
    let e = load_checked(&mut vs, &ckpt).unwrap_err().to_string();
    assert!(
        e.contains("fc1.bias has dtype Int64, the model needs Float (integer and bool tensors are not cast)"),
        "{e}"
    );

    // A tiny minmax once gave all NaN.
    let x = Tensor::from_slice(&[1e-31f32, -1.0, 0.0]);
    let e = f_minmax_quant(&x, 1e-45, 127).unwrap_err().to_string();
    assert!(e.starts_with("minmax must be between MIN_RANGE (1e-30)"), "{e}");
    assert!(f_minmax_quant(&x, 1e40, 127).is_err());
    let q = values(&f_minmax_quant(&x, 1e-30, 127).unwrap());
    assert_eq!(q, [13.0, -127.0, 0.0]);

    // Output that is not [N, classes] is an error, not 0% accuracy.
    let flat = ScriptModel::load(model("flat_output"), Device::Cpu).unwrap();
    let (images, labels) = (
        normalize(&full.test_images.narrow(0, 0, 50), 0.0, 1.0, Device::Cpu).unwrap(),
        full.test_labels.narrow(0, 0, 50),
    );
    let e = flat.accuracy(&images, &labels, 20).unwrap_err().to_string();
    assert!(e.ends_with("expected float logits of shape [20, classes] for 20 inputs, the model returned Float of shape [200]"), "{e}");

    // Empty training sets: the trainer says so; fine-tuning fails at once rather than spinning.
    let empty = tmp.0.join("empty");
    full.subset(0, 100).save_dir(&empty).unwrap();
    let o = cli("train", &["--model", "mlp", "--data", empty.to_str().unwrap(), "--epochs", "1"]);
    assert_one_line_failure(&o, "the training set is empty", "train on no digits");
    let started = std::time::Instant::now();
    let o = cli(
        "quantize_torchscript",
        &[
            "--model",
            model("mlp_scripted").to_str().unwrap(),
            "--data",
            empty.to_str().unwrap(),
            "--finetune-epochs",
            "1000000000",
            "--device",
            "cpu",
        ],
    );
    assert_one_line_failure(&o, "fine-tuning needs training digits, got none", "finetune on no digits");
    assert!(started.elapsed().as_secs() < 60);

    // A valid multi-member gzip (two members concatenated) reads as the whole file.
    use std::io::Write;
    let raw = std::fs::read(Path::new(data).join(MNIST_FILES[1])).unwrap();
    let mut two = Vec::new();
    for part in [&raw[..100], &raw[100..]] {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(part).unwrap();
        two.extend(gz.finish().unwrap());
    }
    let multi = tmp.0.join("multi");
    std::fs::create_dir_all(&multi).unwrap();
    for n in MNIST_FILES {
        std::fs::copy(Path::new(data).join(n), multi.join(n)).unwrap();
    }
    std::fs::remove_file(multi.join(MNIST_FILES[1])).unwrap();
    std::fs::write(multi.join(format!("{}.gz", MNIST_FILES[1])), two).unwrap();
    let read = Mnist::load_dir(&multi).unwrap();
    common::assert_exact(&read.train_labels, &full.train_labels.narrow(0, 0, 300), "multi-member gzip");
}

// 9. Messages without C++ frames, destinations checked first, no temporary files left behind.
#[test]
fn errors_are_one_line_and_files_are_checked_and_cleaned() {
    // A libtorch error keeps its message and drops the backtrace.
    let a = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
    let e = torchapprox::Error::from(a.f_mm(&a).unwrap_err()).to_string();
    assert!(e.starts_with("libtorch: mat1 and mat2 shapes cannot be multiplied (2x3 and 2x3)"), "{e}");
    assert!(!e.contains('\n') && !e.contains("frame #") && !e.contains("Exception raised"), "{e}");
    // A TorchScript interpreter error keeps the line that says why.
    let mlp = ScriptModel::load(model("mlp_scripted"), Device::Cpu).unwrap();
    let e = mlp.forward(&Tensor::zeros([2, 5], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(e.contains("RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x5 and 784x256)"), "{e}");
    assert!(!e.contains('\n'), "{e}");

    let tmp = TempDir::new("dest");
    let missing = tmp.0.join("no/such/folder/model.safetensors");
    let e = check_destination(&missing).unwrap_err().to_string();
    assert!(e.contains("folder") && e.contains("does not exist"), "{e}");
    let e = check_destination(&tmp.0).unwrap_err().to_string();
    assert!(e.ends_with("it is a folder"), "{e}");
    let started = std::time::Instant::now();
    let o = cli("train", &["--model", "mlp", "--epochs", "50", "--save", missing.to_str().unwrap()]);
    assert_one_line_failure(&o, "does not exist", "train --save into a missing folder");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("epoch"), "trained before refusing");
    assert!(started.elapsed().as_secs() < 60);
    let o = cli(
        "quantize_torchscript",
        &["--model", model("mlp_scripted").to_str().unwrap(), "--out", tmp.0.to_str().unwrap()],
    );
    assert_one_line_failure(&o, "it is a folder", "quantize_torchscript --out a folder");

    // Leftovers of killed saves (processes that no longer run) go at the next save; a live one stays.
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = vs.root().zeros("w", &[3]);
    let path = tmp.0.join("m.safetensors");
    let dead: Vec<PathBuf> = (0..20)
        .map(|i| tmp.0.join(format!(".m.safetensors.torchapprox-{}-0.tmp.safetensors", 4_194_400 + i)))
        .collect();
    for d in &dead {
        std::fs::write(d, b"partial").unwrap();
    }
    let live = tmp.0.join(".m.safetensors.torchapprox-1-0.tmp.safetensors");
    std::fs::write(&live, b"partial").unwrap();
    save_atomic(&vs, &path).unwrap();
    assert!(dead.iter().all(|d| !d.exists()), "stale temporary files remain");
    assert!(live.exists(), "the temporary file of a running process (pid 1) was removed");
    let left: Vec<_> = std::fs::read_dir(&tmp.0).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    let mut vs2 = nn::VarStore::new(Device::Cpu);
    let _ = vs2.root().ones("w", &[3]);
    load_checked(&mut vs2, &path).unwrap();
    assert_eq!(values(&vs2.variables()["w"]), [0.0; 3]);
}
