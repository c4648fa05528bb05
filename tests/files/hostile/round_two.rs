//! Hostile input, round two (issue 16): special files as destinations, outputs over their own
//! inputs, float flags beyond float32, non-finite checkpoints, poisoned loads, the table
//! kernels' edge cases, oversized files, thread counts, and the smaller ones.

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tch::nn;
use tch::{Device, Kind, Tensor};
use torchapprox::approx::{lut_conv2d, lut_matmul, lut_matmul_gather, Multiplier};
use torchapprox::checkpoint::{load_checked, save_atomic};
use torchapprox::data::{Mnist, MNIST_FILES};
use torchapprox::files::{read_safetensors, FileProblem, OutputProblem};
use torchapprox::import::{import_safetensors, ImportOptions};
use torchapprox::models::Architecture;
use torchapprox::quantizers::{f_pact_quant, ApproxQuantizer, MinMaxQuant, PACTQuant};
use torchapprox::torchscript::{PtqConfig, RewriteConfig, ScriptModel};
use torchapprox::Error;

use super::{assert_one_line_failure, cli, model};
use crate::common::{self, TempDir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A FIFO at `path` (no root needed).
fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

fn is_fifo(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// A checkpoint of the MLP the trainer builds, written by the trainer itself.
fn mlp_checkpoint(dir: &Path) -> PathBuf {
    let ck = dir.join("mlp.safetensors");
    let o = cli("train", &["--model", "mlp", "--epochs", "0", "--device", "cpu", "--save", s(&ck)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ck
}

/// `src` with tensor `name` replaced by `value` (every element), written to `dst`.
fn poisoned(src: &Path, dst: &Path, name: &str, value: f32) {
    let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(src)
        .unwrap()
        .into_iter()
        .map(|(n, t)| if n == name { (n, t.full_like(value as f64)) } else { (n, t) })
        .collect();
    Tensor::write_safetensors(&tensors, dst).unwrap();
}

// 1. An atomic save once turned /dev/null (or any device, FIFO or socket) into a regular file.
#[test]
fn special_files_are_never_replaced() {
    let tmp = TempDir::new("special");
    let fifo = tmp.0.join("out.fifo");
    mkfifo(&fifo);
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = vs.root().zeros("w", &[2]);
    let named = tmp.0.join("ck.safetensors");
    mkfifo(&named);
    match save_atomic(&vs, &named) {
        Err(Error::Output { problem: OutputProblem::Special("FIFO"), .. }) => {}
        other => panic!("expected a refused FIFO, got {other:?}"),
    }
    assert!(is_fifo(&named));
    let ck = mlp_checkpoint(&tmp.0);
    let fifo_s = fifo.with_extension("safetensors");
    mkfifo(&fifo_s);
    let needle = "it is a FIFO, not a regular file";
    let o = cli("train", &["--model", "mlp", "--epochs", "0", "--load", s(&ck), "--save", s(&fifo_s)]);
    assert_one_line_failure(&o, needle, "train --save FIFO");
    let o = cli("custom_net", &["--epochs", "0", "--out", s(&fifo_s)]);
    assert_one_line_failure(&o, needle, "custom_net --out FIFO");
    let o = cli("quantize_torchscript", &["--model", s(&model("mlp_scripted")), "--out", s(&fifo)]);
    assert_one_line_failure(&o, needle, "quantize_torchscript --out FIFO");
    let o = cli("multiplier", &["--multiplier", "drum:4", "--heatmap", s(&fifo)]);
    assert_one_line_failure(&o, needle, "multiplier --heatmap FIFO");
    let o = cli("multiplier", &["--multiplier", "drum:4", "--export", s(&fifo)]);
    assert_one_line_failure(&o, needle, "multiplier --export FIFO");
    let o = cli("explore", &["--load", s(&ck), "--plot", s(&fifo)]);
    assert_one_line_failure(&o, needle, "explore --plot FIFO");
    // A symlink to the FIFO is refused as the FIFO.
    let link = tmp.0.join("link.pt");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    let o = cli("quantize_torchscript", &["--model", s(&model("mlp_scripted")), "--out", s(&link)]);
    assert_one_line_failure(&o, needle, "quantize_torchscript --out symlink to a FIFO");
    assert!(is_fifo(&fifo) && is_fifo(&fifo_s));
    // A private character device (root only), as /dev/null once was.
    let null = tmp.0.join("null");
    let made = Command::new("mknod").args([s(&null), "c", "1", "3"]).status().is_ok_and(|st| st.success());
    if made {
        let o = cli("quantize_torchscript", &["--model", s(&model("mlp_scripted")), "--out", s(&null)]);
        assert_one_line_failure(&o, "it is a character device, not a regular file", "--out char device");
        let kept = std::fs::symlink_metadata(&null).unwrap().file_type();
        assert!(kept.is_char_device(), "the device node was replaced");
    } else {
        eprintln!("SKIPPED the character-device case: mknod needs root here");
    }
    // A symlink to a regular file is written through: the link stays a link.
    let target = tmp.0.join("target.safetensors");
    std::fs::write(&target, b"old").unwrap();
    let link = tmp.0.join("via-link.safetensors");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    save_atomic(&vs, &link).unwrap();
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(read_safetensors(&target).unwrap().len(), 1);
}

// 2. `multiplier --heatmap` once overwrote its own table in place.
#[test]
fn no_output_overwrites_its_input() {
    let tmp = TempDir::new("own-input");
    let table = tmp.0.join("table.bin");
    let bytes: Vec<u8> = Multiplier::exact().table().iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&table, &bytes).unwrap();
    let link = tmp.0.join("link.png");
    std::os::unix::fs::symlink(&table, &link).unwrap();
    for out in [&table, &link] {
        let o = cli("multiplier", &["--multiplier", s(&table), "--heatmap", s(out)]);
        assert_one_line_failure(&o, "it is the input", "multiplier --heatmap over its table");
        let o = cli("multiplier", &["--multiplier", s(&table), "--export", s(out)]);
        assert_one_line_failure(&o, "it is the input", "multiplier --export over its table");
        assert_eq!(std::fs::read(&table).unwrap(), bytes, "the table changed");
    }
    let m = model("mlp_scripted");
    let copy = tmp.0.join("m.pt");
    std::fs::copy(&m, &copy).unwrap();
    let o = cli("quantize_torchscript", &["--model", s(&copy), "--out", s(&copy)]);
    assert_one_line_failure(&o, "it is the input", "quantize_torchscript --out over its model");
    let ck = mlp_checkpoint(&tmp.0);
    let o = cli("train", &["--model", "mlp", "--epochs", "0", "--load", s(&ck), "--save", s(&ck)]);
    assert_one_line_failure(&o, "it is the input", "train --save over its --load");
    let o = cli("explore", &["--model", "mlp", "--load", s(&ck), "--plot", s(&ck)]);
    assert_one_line_failure(&o, "it is the input", "explore --plot over its --load");
}

// 3. Huge finite learning rates once panicked inside tch's optimizer.
#[test]
fn float_flags_beyond_float32_are_refused_up_front() {
    let tmp = TempDir::new("lr");
    let out = tmp.0.join("x.safetensors");
    let lr = "at most 3.4e37 (Adam's first step, lr / (1 - beta1), must fit float32), got";
    let o = cli("train", &["--model", "mlp", "--epochs", "1", "--lr", "1e38", "--save", s(&out)]);
    assert_one_line_failure(
        &o,
        &format!("--lr must be {lr} 100000000000000000000000000000000000000"),
        "train",
    );
    let o = cli("custom_net", &["--lr", "1e38", "--out", s(&out)]);
    assert_one_line_failure(&o, "--lr must be at most 3.4e37", "custom_net");
    let pt = tmp.0.join("q.pt");
    let mlp = model("mlp_scripted");
    let args = ["--model", s(&mlp), "--finetune-epochs", "1", "--finetune-lr", "1e38"];
    let o = cli("quantize_torchscript", &[&args[..], &["--out", s(&pt)]].concat());
    assert_one_line_failure(&o, "fine-tuning learning rate must be at most 3.4e37", "quantize_torchscript");
    let o = cli("train", &["--model", "mlp", "--epochs", "0", "--init-alpha", "1e308", "--save", s(&out)]);
    assert_one_line_failure(&o, "--init-alpha must be within float32's range", "--init-alpha 1e308");
    let o = cli("train", &["--model", "mlp", "--epochs", "0", "--noise-std", "1e39"]);
    assert_one_line_failure(&o, "--noise-std must be within float32's range", "--noise-std 1e39");
    assert!(!out.exists() && !pt.exists());
}

// 4. A diverged run once saved 203,532 non-finite values with exit 0.
#[test]
fn non_finite_weights_are_never_written() {
    let tmp = TempDir::new("nan-save");
    let data = tmp.0.join("ten");
    common::embedded_digits().subset(10, 10).save_dir(&data).unwrap();
    let out = tmp.0.join("x.safetensors");
    let args =
        ["--model", "mlp", "--epochs", "1", "--batch-size", "1", "--lr", "3e37", "--schedule", "constant"];
    let o = cli("train", &[&args[..], &["--data", s(&data), "--save", s(&out)]].concat());
    assert_one_line_failure(&o, "training diverged in epoch 1", "train --lr 3e37");
    assert!(!out.exists(), "a diverged run wrote {}", out.display());
    // The library refuses as well, naming the variable.
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().zeros("w", &[3]);
    tch::no_grad(|| w.shallow_clone().copy_(&Tensor::from_slice(&[1.0f32, f32::NAN, f32::INFINITY])));
    match save_atomic(&vs, &out) {
        Err(Error::NonFiniteTensor { name, count: 2, numel: 3, .. }) => assert_eq!(name, "w"),
        other => panic!("expected NonFiniteTensor, got {other:?}"),
    }
    assert!(!out.exists());
    let mut model = ScriptModel::load(model("mlp_scripted"), Device::Cpu).unwrap();
    let (_, w) = model.parameters().unwrap().remove(0);
    let _ = tch::no_grad(|| w.shallow_clone().fill_(f64::NAN));
    let e = model.save(tmp.0.join("nan.pt")).unwrap_err().to_string();
    assert!(e.contains("holds") && e.contains("non-finite"), "{e}");
    assert!(!tmp.0.join("nan.pt").exists());
    let _ = model.set_kind(Kind::Float);
}

// 5. Poisoned checkpoints (NaN, 0, negative or infinite alphas, NaN weights, inf biases) were accepted.
#[test]
fn poisoned_checkpoints_are_refused_naming_the_tensor() {
    let tmp = TempDir::new("poison");
    let ck = mlp_checkpoint(&tmp.0);
    let bad = tmp.0.join("bad.safetensors");
    let cases: [(&str, f32, &str); 6] = [
        ("fc1.x_quantizer.alpha", f32::NAN, "fc1.x_quantizer.alpha holds 1 non-finite value(s)"),
        ("fc1.x_quantizer.alpha", 0.0, "fc1.x_quantizer.alpha is 0, but a PACT alpha must be positive"),
        ("fc2.x_quantizer.alpha", -3.0, "fc2.x_quantizer.alpha is -3, but a PACT alpha must be positive"),
        ("fc1.x_quantizer.alpha", f32::INFINITY, "non-finite"),
        ("fc1.weight", f32::NAN, "fc1.weight holds 200704 non-finite value(s) (NaN or ±inf) of 200704"),
        ("fc2.bias", f32::INFINITY, "fc2.bias holds 10 non-finite value(s)"),
    ];
    for (name, value, needle) in cases {
        poisoned(&ck, &bad, name, value);
        let what = format!("{name} = {value}");
        let o = cli("train", &["--model", "mlp", "--epochs", "0", "--load", s(&bad)]);
        assert_one_line_failure(&o, needle, &format!("--load, {what}"));
        let o = cli("train", &["--model", "mlp", "--epochs", "0", "--init-from", s(&bad)]);
        assert_one_line_failure(&o, needle, &format!("--init-from, {what}"));
        let mut vs = nn::VarStore::new(Device::Cpu);
        let _net = Architecture::Mlp.build(&vs.root(), |_| Default::default()).unwrap();
        let e = load_checked(&mut vs, &bad).unwrap_err().to_string();
        assert!(e.contains(needle), "load_checked, {what}: {e}");
        let partial = ImportOptions { partial: true, ..Default::default() };
        let e = import_safetensors(&vs, &bad, &partial).unwrap_err().to_string();
        assert!(e.contains(needle), "import_safetensors, {what}: {e}");
    }
    // The untouched checkpoint still loads.
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _net = Architecture::Mlp.build(&vs.root(), |_| Default::default()).unwrap();
    load_checked(&mut vs, &ck).unwrap();
}

// 6. The table kernels once panicked on empty kernels, 1-d and undefined inputs, and the
// gather path turned out-of-range operands into garbage.
#[test]
fn table_kernels_validate_identically_on_both_paths() {
    let m = Multiplier::exact();
    let x4 = Tensor::zeros([1, 2, 5, 5], (Kind::Float, Device::Cpu));
    for (w, what) in [
        (Tensor::zeros([3, 0, 3, 3], (Kind::Float, Device::Cpu)), "0 input channels"),
        (Tensor::zeros([3, 2, 0, 0], (Kind::Float, Device::Cpu)), "a 0x0 kernel"),
    ] {
        let x = if w.size()[1] == 0 {
            Tensor::zeros([1, 0, 5, 5], (Kind::Float, Device::Cpu))
        } else {
            x4.copy()
        };
        match lut_conv2d(&x, &w, &m, 1, 0, 1, 1) {
            Err(Error::Shape { what: w, .. }) => assert_eq!(w, "lut_conv2d weight"),
            other => panic!("{what}: expected a shape error, got {other:?}"),
        }
    }
    let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).reshape([2, 2]);
    let one_d = Tensor::from_slice(&[1.0f32, 2.0]);
    for f in [lut_matmul, lut_matmul_gather] {
        assert!(matches!(f(&one_d, &w, &m), Err(Error::Shape { .. })));
        assert!(matches!(f(&Tensor::new(), &w, &m), Err(Error::Undefined(_))));
        assert!(matches!(f(&w, &Tensor::new(), &m), Err(Error::Undefined(_))));
    }
    for bad in [128.0f32, -129.0, 0.5, f32::NAN, f32::INFINITY] {
        let x = Tensor::from_slice(&[1.0f32, bad]).reshape([1, 2]);
        let cpu = lut_matmul(&x, &w, &m).unwrap_err().to_string();
        let gather = lut_matmul_gather(&x, &w, &m).unwrap_err().to_string();
        assert_eq!(cpu, gather, "operand {bad}");
        assert!(cpu.contains(&format!("the input holds {bad}")), "{cpu}");
        let cpu = lut_matmul(&w, &x, &m).unwrap_err().to_string();
        assert_eq!(cpu, lut_matmul_gather(&w, &x, &m).unwrap_err().to_string(), "weight {bad}");
    }
    // Valid operands agree.
    let x = Tensor::from_slice(&[-128.0f32, 127.0, 3.0, -7.0]).reshape([2, 2]);
    common::assert_exact(&lut_matmul(&x, &w, &m).unwrap(), &lut_matmul_gather(&x, &w, &m).unwrap(), "agree");
}

fn sparse(path: &Path, head: &[u8], len: u64) {
    let f = std::fs::File::create(path).unwrap();
    (&f).write_all(head).unwrap();
    f.set_len(len).unwrap();
}

fn safetensors_header(json: &str) -> Vec<u8> {
    let mut b = (json.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(json.as_bytes());
    b
}

// 7. An 8 GiB sparse file (safetensors, multiplier table) or an honest gzip of 4.1 million
// images once took gigabytes before its check.
#[test]
fn sizes_are_checked_before_payloads_are_read() {
    let tmp = TempDir::new("sizes");
    let baseline = common::peak_rss();
    let st = tmp.0.join("big.safetensors");
    sparse(&st, &safetensors_header(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#), 8 << 30);
    let e = read_safetensors(&st).unwrap_err().to_string();
    assert!(e.contains("trailing byte(s) after the last tensor (its header accounts for 8 of"), "{e}");
    let o = cli("train", &["--model", "mlp", "--epochs", "0", "--init-from", s(&st)]);
    assert_one_line_failure(&o, "trailing byte(s)", "--init-from 8 GiB");
    let table = tmp.0.join("big.npy");
    sparse(&table, b"\x93NUMPY", 8 << 30);
    let e = Multiplier::load(&table).unwrap_err().to_string();
    assert!(e.contains("8589934592 bytes is more than a multiplier table can hold"), "{e}");
    let o = cli("multiplier", &["--multiplier", s(&table)]);
    assert_one_line_failure(&o, "is more than a multiplier table can hold", "multiplier 8 GiB");
    // Honest headers whose counts disagree: 4.1 million images, the embedded labels.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&super::idx_header(0x0803, &[4_100_000, 28, 28])).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..256 {
        gz.write_all(&zeros).unwrap();
    }
    let e = super::mnist_with(0, &gz.finish().unwrap()).unwrap_err().to_string();
    assert_eq!(e, "train split: 4100000 images but 8000 labels");
    if let (Some(before), Some(after)) = (baseline, common::peak_rss()) {
        let grew = after.saturating_sub(before);
        assert!(grew < 256 << 20, "peak memory grew by {} MiB", grew >> 20);
    }
}

// 8. `--threads 100000` hung every example; 2147483647 exhausted libgomp.
#[test]
fn thread_counts_are_bounded() {
    let max = torchapprox::args::max_threads();
    let needle = format!("--threads must be 0 (libtorch's default) up to {max} (four per core here), got");
    for n in ["100000", "2147483647", "-1"] {
        for (bin, args) in [
            ("train", &["--epochs", "0"][..]),
            ("custom_net", &["--epochs", "0"][..]),
            ("quantize_torchscript", &["--model", "x.pt"][..]),
            ("multiplier", &["--multiplier", "exact"][..]),
            ("quantize", &[][..]),
        ] {
            let o = cli(bin, &[args, &["--threads", n]].concat());
            assert_one_line_failure(&o, &format!("{needle} {n}"), &format!("{bin} --threads {n}"));
        }
    }
    for (args, needle) in [
        (&["--threads", "0"][..], "--threads must list counts from 1 to"),
        (&["--threads", "-1"][..], "--threads must list counts from 1 to"),
        (&["--sizes", "-1"][..], "--sizes must list element counts of at least 1, got -1"),
    ] {
        let o = cli("bench", args);
        assert_one_line_failure(&o, needle, &format!("bench {args:?}"));
    }
}

// 9. The smaller ones.
#[test]
fn temporaries_of_killed_writers_are_cleaned_by_every_writer() {
    let tmp = TempDir::new("stale");
    // A pid that cannot be running: above the kernel's pid_max.
    let dead = 1u32 << 30;
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = vs.root().zeros("w", &[2]);
    let ck = tmp.0.join("ck.safetensors");
    let stale = tmp.0.join(format!(".ck.safetensors.torchapprox-{dead}-0.tmp.safetensors"));
    std::fs::write(&stale, b"half").unwrap();
    save_atomic(&vs, &ck).unwrap();
    assert!(!stale.exists(), "save_atomic left {}", stale.display());
    let out = tmp.0.join("out.pt");
    let stale = tmp.0.join(format!(".out.pt.torchapprox-{dead}-3.tmp.pt"));
    std::fs::write(&stale, b"half").unwrap();
    ScriptModel::load(model("mlp_scripted"), Device::Cpu).unwrap().save(&out).unwrap();
    assert!(!stale.exists(), "ScriptModel::save left {}", stale.display());
    let png = tmp.0.join("h.png");
    let stale = tmp.0.join(format!(".h.png.torchapprox-{dead}-0.tmp.png"));
    std::fs::write(&stale, b"half").unwrap();
    let o = cli("multiplier", &["--multiplier", "drum:4", "--heatmap", s(&png)]);
    assert!(o.status.success() && png.exists() && !stale.exists());
    let left: Vec<String> = std::fs::read_dir(&tmp.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn messages_name_the_problem_not_the_parser() {
    let tmp = TempDir::new("messages");
    let dup = tmp.0.join("dup.safetensors");
    let mut b = safetensors_header(
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
    );
    b.extend_from_slice(&[0u8; 8]);
    std::fs::write(&dup, &b).unwrap();
    let e = read_safetensors(&dup).unwrap_err().to_string();
    assert!(e.ends_with("not a readable .safetensors file (tensor a appears twice in its header)"), "{e}");
    let trailing = tmp.0.join("trailing.safetensors");
    let mut b = safetensors_header(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#);
    b.extend_from_slice(&[0u8; 7]);
    std::fs::write(&trailing, &b).unwrap();
    let e = read_safetensors(&trailing).unwrap_err().to_string();
    assert!(e.contains("3 trailing byte(s) after the last tensor"), "{e}");
    // A folder or a FIFO given as a file.
    let fifo = tmp.0.join("in.safetensors");
    mkfifo(&fifo);
    match read_safetensors(&fifo) {
        Err(Error::InputFile { problem: FileProblem::Special("FIFO"), .. }) => {}
        other => panic!("expected a FIFO refusal, got {other:?}"),
    }
    let e = read_safetensors(&tmp.0).unwrap_err().to_string();
    assert!(e.ends_with("is a folder, not a file"), "{e}");
    let e = ScriptModel::load(&fifo, Device::Cpu).unwrap_err().to_string();
    assert!(e.ends_with("is a FIFO, not a regular file"), "{e}");
    let e = Multiplier::load(&tmp.0).unwrap_err().to_string();
    assert!(e.ends_with("is a folder, not a file"), "{e}");
    let o = cli("multiplier", &["--multiplier", s(&fifo)]);
    assert_one_line_failure(&o, "is a FIFO, not a regular file", "multiplier FIFO");
    // MNIST: a folder where a file should be.
    let data = tmp.0.join("data");
    common::embedded_digits().subset(10, 10).save_dir(&data).unwrap();
    std::fs::remove_file(data.join(MNIST_FILES[1])).unwrap();
    std::fs::create_dir(data.join(MNIST_FILES[1])).unwrap();
    let e = Mnist::load_dir(&data).unwrap_err().to_string();
    assert!(e.ends_with("train-labels-idx1-ubyte: is a folder, not a file"), "{e}");
    // An upper-case .SAFETENSORS state dict is read as one.
    let ck = mlp_checkpoint(&tmp.0);
    let upper = tmp.0.join("MLP.SAFETENSORS");
    std::fs::copy(&ck, &upper).unwrap();
    let o = cli("train", &["--model", "mlp", "--epochs", "0", "--init-from", s(&upper), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A right-to-left override in a name is escaped, not printed raw.
    let rtl = tmp.0.join("evil\u{202e}gnp.safetensors");
    let o = cli("train", &["--model", "mlp", "--epochs", "0", "--init-from", s(&rtl)]);
    assert_one_line_failure(&o, "evil\\u{202e}gnp.safetensors: no such file", "RTL name");
    assert!(!String::from_utf8_lossy(&o.stderr).contains('\u{202e}'));
    // quantize and bench exit with one line under RUST_BACKTRACE=1 as the others do.
    for (bin, args) in [("quantize", &["--bits", "1"][..]), ("bench", &["--sizes", "0"][..])] {
        let o =
            Command::new(common::example_bin(bin)).args(args).env("RUST_BACKTRACE", "1").output().unwrap();
        assert_one_line_failure(&o, "", &format!("{bin} {args:?} under RUST_BACKTRACE=1"));
        assert!(!String::from_utf8_lossy(&o.stderr).contains("Stack backtrace"));
    }
}

#[test]
fn quantizer_edge_values_are_refused_or_saturated_as_documented() {
    let x = Tensor::from_slice(&[0.5f32, -1.0, 2.0]);
    for a in [-1.0f32, f32::NEG_INFINITY, 0.0, f32::NAN, f32::INFINITY] {
        match f_pact_quant(&x, &Tensor::from_slice(&[a]), 7) {
            Err(Error::Argument { what: "alpha", .. }) => {}
            other => panic!("alpha {a}: expected a refusal, got {other:?}"),
        }
    }
    // MinMax and PACT saturate: a finite input never dequantizes to ±inf, on every path.
    let big = Tensor::from_slice(&[f32::MAX, -f32::MAX, 1.0, -3e38]);
    let vs = nn::VarStore::new(Device::Cpu);
    for bits in [2u32, 3] {
        let pact = PACTQuant::new(vs.root() / format!("p{bits}"), bits);
        let _ = tch::no_grad(|| pact.alpha().shallow_clone().fill_(f32::MAX as f64));
        let quantizers: [&dyn ApproxQuantizer; 2] = [&MinMaxQuant::new(vs.root() / "minmax", bits), &pact];
        for q in quantizers {
            for (x, path) in [(big.copy(), "kernel"), (big.view([2, 2]).t_(), "strided")] {
                let y = q.f_fake_quantize(&x).unwrap();
                let v = common::values(&y);
                assert!(v.iter().all(|e| e.is_finite()), "{q:?} {bits} bits {path}: {v:?}");
                assert!(v.iter().all(|e| e.abs() <= f32::MAX as f64), "{q:?} {bits} bits {path}: {v:?}");
            }
        }
    }
}

#[test]
fn a_collapsed_layer_is_reported_whatever_its_sqnr() {
    let model = ScriptModel::load(model("mlp_scripted"), Device::Cpu).unwrap();
    let (name, w) = model.parameters().unwrap().into_iter().find(|(_, t)| t.dim() == 2).unwrap();
    tch::no_grad(|| {
        let _ = w.shallow_clone().get(0).get(0).fill_(1e6);
    });
    let reports = model.quantize_weights(&PtqConfig { bits: 8, ..Default::default() }).unwrap();
    let r = reports.iter().find(|r| r.name == name).unwrap();
    assert!(r.sqnr_db > 50.0, "the outlier dominates the SQNR: {}", r.sqnr_db);
    assert!(r.collapsed() && r.zeroed > 0.99, "{name}: zeroed {}", r.zeroed);
    assert!(reports.iter().filter(|r| r.name != name).all(|r| !r.collapsed()));
}

#[test]
fn rewrite_refusals_name_the_layer_and_the_real_reason() {
    let tmp = TempDir::new("own-attr");
    let path = tmp.0.join("own.pt");
    let script = format!(
        "import torch\nclass M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.fc = torch.nn.Linear(4, 2)\n        self.fc.register_buffer('x_quantizer', torch.zeros(1))\n    def forward(self, x):\n        return self.fc(x)\ntorch.jit.script(M()).save({:?})\ntorch.jit.script(torch.nn.Conv2d(1, 2, 3, padding=1, padding_mode='reflect')).save({:?})\ntorch.jit.script(torch.nn.Linear(4, 3)).save({:?})\n",
        s(&path),
        s(&tmp.0.join("root_reflect.pt")),
        s(&tmp.0.join("root_linear.pt"))
    );
    // A file, not `-c`: TorchScript reads the class's source.
    let py = tmp.0.join("make.py");
    std::fs::write(&py, script).unwrap();
    let o = Command::new(common::python()).arg(&py).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut m = ScriptModel::load(&path, Device::Cpu).unwrap();
    let e = m.quantize_layers(&RewriteConfig::default()).unwrap_err().to_string();
    assert!(e.contains("fc has an attribute x_quantizer of its own"), "{e}");
    assert!(!e.contains("rewritten before"), "{e}");
    // A layer that is the whole model is rewritten too, reflect padding included (issue 20).
    let mut m = ScriptModel::load(tmp.0.join("root_reflect.pt"), Device::Cpu).unwrap();
    let x = common::randn(&[2, 1, 6, 6], 2, Device::Cpu);
    let float = m.forward(&x).unwrap();
    let r = m.quantize_layers(&RewriteConfig::default()).unwrap();
    assert_eq!(r.layers[0].name, "");
    assert!(
        matches!(r.layers[0].op, torchapprox::torchscript::LayerOp::Conv2d { input_pad: Some(_), .. }),
        "{r:?}"
    );
    m.calibrate(&x, 1, 2).unwrap();
    let diff = (m.forward(&x).unwrap() - float).abs().max().double_value(&[]);
    assert!(diff > 0.0 && diff < 0.1, "8-bit rewrite of a root reflect Conv2d differs by {diff}");
    // A model that is one Linear is rewritten like any other layer.
    let mut m = ScriptModel::load(tmp.0.join("root_linear.pt"), Device::Cpu).unwrap();
    let x = common::randn(&[5, 4], 1, Device::Cpu);
    let float = m.forward(&x).unwrap();
    let r = m.quantize_layers(&RewriteConfig::default()).unwrap();
    assert_eq!(r.layers.len(), 1);
    let q = m.forward(&x).unwrap();
    assert_eq!(q.size(), [5, 3]);
    let diff = (q - float).abs().max().double_value(&[]);
    assert!(diff > 0.0 && diff < 0.1, "8-bit rewrite of a root Linear differs by {diff}");
}

// 10. quantize_layers once round-tripped through a predictable file in the temp folder.
#[test]
fn quantize_layers_copies_in_memory_and_threads_do_not_mix_models() {
    let before: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("torchapprox-rewrite-"))
        .map(|e| e.path())
        .collect();
    let names = ["mlp_scripted", "lenet_traced", "bn_dw_cnn", "nobias_scripted"];
    let layers: Vec<Vec<String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = names
            .iter()
            .map(|n| {
                sc.spawn(move || {
                    let mut m = ScriptModel::load(model(n), Device::Cpu).unwrap();
                    let r = m.quantize_layers(&RewriteConfig::default()).unwrap();
                    r.layers.into_iter().map(|l| l.name).collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (n, got) in names.iter().zip(&layers) {
        let mut m = ScriptModel::load(model(n), Device::Cpu).unwrap();
        let alone: Vec<String> = m
            .quantize_layers(&RewriteConfig::default())
            .unwrap()
            .layers
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(got, &alone, "{n}: another thread's model leaked in");
    }
    let after: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("torchapprox-rewrite-"))
        .map(|e| e.path())
        .collect();
    assert_eq!(before, after, "quantize_layers wrote to the temp folder");
}
