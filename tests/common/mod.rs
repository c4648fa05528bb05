//! Shared helpers for the integration tests: fixtures, devices, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};

/// Path of a file under `tests/fixtures`.
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join(name)
}

/// Every tensor of a fixture file, by name.
pub fn load_fixture(name: &str) -> HashMap<String, Tensor> {
    let path = fixture_path(name);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| {
            panic!("reading {}: {e} (regenerate with scripts/fixtures/gen_fixtures.py)", path.display())
        })
        .into_iter()
        .collect()
}

/// The embedded MNIST folder, `examples/data/mnist-10k`.
pub fn embedded_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/mnist-10k")
}

/// The embedded 10,000 digits.
pub fn embedded_digits() -> torchapprox::data::Mnist {
    torchapprox::data::Mnist::embedded().unwrap()
}

/// The embedded test digits as the PyTorch fixtures take them (pixel / 255), and their labels.
pub fn embedded_test_set() -> (Tensor, Tensor) {
    let m = embedded_digits();
    (torchapprox::data::normalize(&m.test_images, 0.0, 1.0, Device::Cpu).unwrap(), m.test_labels)
}

/// The venv's Python, which scripts/setup.sh installs.
pub fn python() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(p.exists(), "run scripts/setup.sh: {} is missing", p.display());
    p
}

/// Runs `scripts/checks/{script} MODEL IO` with the venv's Python, where IO holds the input `x`
/// and Rust's output `y`; panics with what PyTorch said unless it agrees (exit 0), and
/// returns what it printed.
pub fn pytorch_agrees(script: &str, model: &std::path::Path, x: &Tensor, y: Tensor, what: &str) -> String {
    let stem = model.file_stem().unwrap().to_string_lossy();
    let io = model.with_file_name(format!("{stem}-io.safetensors"));
    Tensor::write_safetensors(&[("x", x.shallow_clone()), ("y", y)], &io).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/checks").join(script);
    let o = std::process::Command::new(python()).arg(script).arg(model).arg(&io).output().unwrap();
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{what}: PyTorch disagrees: {said} {}", String::from_utf8_lossy(&o.stderr));
    said
}

/// The CUDA device when there is one; otherwise prints that `what` was skipped.
pub fn cuda_or_skip(what: &str) -> Option<Device> {
    if torchapprox::cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        eprintln!("SKIPPED on this machine (no CUDA device): {what}");
        None
    }
}

/// The devices to run device-generic assertions on: CPU, plus CUDA when present.
pub fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    if torchapprox::cuda::is_available() {
        d.push(Device::Cuda(0));
    }
    d
}

/// A tensor's values as f64, flattened.
pub fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// Asserts bit-for-bit equal values (NaN equal to NaN), naming the first difference.
pub fn assert_exact(actual: &Tensor, expected: &Tensor, what: &str) {
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    let (a, e) = (values(actual), values(expected));
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        assert!(x == y || (x.is_nan() && y.is_nan()), "{what}: element {i}: got {x}, expected {y}");
    }
}

/// Asserts `|actual - expected| <= atol + rtol * |expected|` elementwise.
pub fn assert_close(actual: &Tensor, expected: &Tensor, rtol: f64, atol: f64, what: &str) {
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    let (a, e) = (values(actual), values(expected));
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        assert!(
            approx::relative_eq!(*x, *y, epsilon = atol, max_relative = rtol)
                || (x - y).abs() <= atol + rtol * y.abs(),
            "{what}: element {i}: got {x}, expected {y} (rtol {rtol}, atol {atol})"
        );
    }
}

/// A seeded normal tensor of float32 on `device`.
pub fn randn(shape: &[i64], seed: i64, device: Device) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_device(device)
}

/// A fresh folder under the system's temporary directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `torchapprox-{tag}-{pid}`, emptying it first.
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("torchapprox-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The path of an example binary, building it where a filtered `cargo test` did not.
pub fn example_bin(name: &str) -> PathBuf {
    // cargo test builds the examples next to the test binaries' folder.
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("examples").join(name);
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo).args(["build", "--example", name]).status().unwrap();
        assert!(status.success() && bin.exists(), "could not build {}", bin.display());
    }
    bin
}

/// Copies the zip archive `src` to `dst` (stored, uncompressed, as PyTorch writes it),
/// passing each member through `edit`, which may change its bytes.
pub fn rewrite_zip(src: &std::path::Path, dst: &std::path::Path, edit: impl Fn(&str, Vec<u8>) -> Vec<u8>) {
    use std::io::{Read, Write};
    let mut zin = zip::ZipArchive::new(std::fs::File::open(src).unwrap()).unwrap();
    let mut zout = zip::ZipWriter::new(std::fs::File::create(dst).unwrap());
    let opts = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..zin.len() {
        let mut f = zin.by_index(i).unwrap();
        let name = f.name().to_string();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        zout.start_file(name.clone(), opts).unwrap();
        zout.write_all(&edit(&name, bytes)).unwrap();
    }
    zout.finish().unwrap();
}

/// The process's peak resident memory so far (VmHWM), in bytes; `None` without /proc.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A VarStore for quantizers whose variables a test does not keep (MinMax in batch mode).
pub fn scratch() -> tch::nn::VarStore {
    tch::nn::VarStore::new(Device::Cpu)
}
