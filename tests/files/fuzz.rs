//! Random byte flips and truncations of a TorchScript fixture and of IDX files (fixed seeds):
//! every case ends in success or one clear line, never a signal, a panic or a hang. The same for
//! safetensors state dicts and `.npy` multiplier tables, within a bounded peak memory.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{fixture_path, TempDir};
use tch::{Device, Kind, Tensor};
use torchapprox::data::{Mnist, MNIST_FILES};
use torchapprox::torchscript::{PtqConfig, ScriptModel};

/// xorshift64*: a fixed, dependency-free stream of test positions.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}

/// `count` flipped copies (1-4 bytes each; two in three inside `focus`, where the pickles,
/// code and zip directory live) and `truncations` cut copies of `bytes`.
fn mutations(
    bytes: &[u8],
    focus: std::ops::Range<usize>,
    seed: u64,
    count: usize,
    truncations: usize,
) -> Vec<Vec<u8>> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    for i in 0..count {
        let mut b = bytes.to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = if i % 3 == 0 { rng.below(b.len()) } else { focus.start + rng.below(focus.len()) };
            b[at] ^= 1 << rng.below(8);
        }
        out.push(b);
    }
    for _ in 0..truncations {
        out.push(bytes[..rng.below(bytes.len())].to_vec());
    }
    out
}

/// Counts a case's outcome: success, or a refusal that must be one non-empty line.
fn tally(result: torchapprox::Result<()>, case: &std::path::Path, ok: &mut usize, refused: &mut usize) {
    match result {
        Ok(()) => *ok += 1,
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n') && !msg.is_empty(), "{}: not one line: {msg}", case.display());
            *refused += 1;
        }
    }
}

/// The worker: loads, quantizes, runs and saves every case in `TA_FUZZ_DIR`, printing each
/// case's name first so that the parent can name the one that killed it.
#[test]
#[ignore = "run in a child process by torchscript_mutations_never_crash"]
fn fuzz_worker() {
    let Ok(dir) = std::env::var("TA_FUZZ_DIR") else { return };
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pt"))
        .collect();
    cases.sort();
    let probe = Tensor::rand([2, 1, 28, 28], (Kind::Float, Device::Cpu));
    let (mut ok, mut refused) = (0, 0);
    for case in cases {
        println!("case {}", case.display());
        std::io::stdout().flush().unwrap();
        let result = ScriptModel::load(&case, Device::Cpu).and_then(|m| {
            // Parameters and buffers through the glue's ta_module_named_buffers.
            let _ = m.state_dict()?;
            let _ = m.forward(&probe)?;
            m.quantize_weights(&PtqConfig { bits: 4, per_channel: true, ..Default::default() })?;
            let _ = m.forward(&probe)?;
            m.save(case.with_extension("out"))
        });
        tally(result, &case, &mut ok, &mut refused);
    }
    println!("done: {ok} ran, {refused} refused with one line");
}

#[test]
fn torchscript_mutations_never_crash() {
    let tmp = TempDir::new("fuzz-ts");
    let src = fixture_path("torchscript/bn_dw_cnn.pt");
    let bytes = std::fs::read(&src).unwrap();
    // The weights sit at the front; the pickles, code and directory after the last data record.
    let zip = zip::ZipArchive::new(std::fs::File::open(&src).unwrap()).unwrap();
    let data_end = (0..zip.len())
        .filter_map(|i| {
            let mut z = zip::ZipArchive::new(std::fs::File::open(&src).unwrap()).unwrap();
            let f = z.by_index_raw(i).unwrap();
            f.name().contains("/data/").then(|| (f.data_start() + f.compressed_size()) as usize)
        })
        .max()
        .unwrap();
    drop(zip);
    let cases = mutations(&bytes, data_end..bytes.len(), 0x5eed, 300, 100);
    for (i, c) in cases.iter().enumerate() {
        std::fs::write(tmp.0.join(format!("case{i:03}.pt")), c).unwrap();
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "fuzz::fuzz_worker", "--ignored", "--nocapture", "--test-threads=1"])
        .env("TA_FUZZ_DIR", &tmp.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut last = String::new();
    let mut done = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok) {
        if line.starts_with("case ") {
            last = line;
        } else if line.starts_with("done: ") {
            done = line;
        }
    }
    let status = child.wait().unwrap();
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert!(status.success(), "worker ended with {status:?} at {last}:\n{stderr}");
    assert!(done.starts_with("done: "), "the worker did not finish: {stderr}");
    eprintln!("{done}");
}

#[test]
fn idx_mutations_never_panic() {
    let dir = common::embedded_dir();
    let small = Mnist::load_dir(&dir).unwrap().subset(50, 20);
    let tmp = TempDir::new("fuzz-idx");
    small.save_dir(&tmp.0).unwrap();
    let plain: Vec<Vec<u8>> = MNIST_FILES.iter().map(|n| std::fs::read(tmp.0.join(n)).unwrap()).collect();
    let gz: Vec<Vec<u8>> =
        MNIST_FILES.iter().map(|n| std::fs::read(dir.join(format!("{n}.gz"))).unwrap()).collect();
    let (mut ok, mut refused) = (0, 0);
    for (which, seed) in [(0usize, 1u64), (1, 2), (2, 3), (3, 4)] {
        for (source, label) in [(&plain, "plain"), (&gz, "gzip")] {
            let original = &source[which];
            let header = 4 + 4 * (if which % 2 == 0 { 3 } else { 1 });
            for case in mutations(original, 0..header.min(original.len()), seed, 30, 10) {
                let pick = |i: usize| if i == which { &case[..] } else { &source[i][..] };
                match Mnist::from_bytes([
                    (MNIST_FILES[0], pick(0)),
                    (MNIST_FILES[1], pick(1)),
                    (MNIST_FILES[2], pick(2)),
                    (MNIST_FILES[3], pick(3)),
                ]) {
                    Ok(m) => {
                        assert_eq!(m.train_images.size()[0], m.train_labels.size()[0]);
                        ok += 1;
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        assert!(!msg.contains('\n'), "{label} {}: {msg}", MNIST_FILES[which]);
                        refused += 1;
                    }
                }
            }
        }
    }
    assert_eq!(ok + refused, 320);
    eprintln!("IDX mutations: {ok} loaded, {refused} refused with one line");
}

/// The worker for safetensors state dicts and `.npy` tables in `TA_FUZZ_FILES`: reads each
/// as the crate reads them, checks every tensor, and ends within a bounded peak memory.
#[test]
#[ignore = "run in a child process by safetensors_and_npy_mutations_never_crash"]
fn files_fuzz_worker() {
    let Ok(dir) = std::env::var("TA_FUZZ_FILES") else { return };
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    cases.sort();
    let (mut ok, mut refused) = (0, 0);
    for case in cases {
        println!("case {}", case.display());
        std::io::stdout().flush().unwrap();
        let result = if case.extension().is_some_and(|e| e == "npy") {
            torchapprox::approx::Multiplier::load(&case).map(|m| {
                let _ = m.metrics();
            })
        } else {
            torchapprox::files::read_safetensors(&case).and_then(|tensors| {
                let origin = case.display().to_string();
                tensors.iter().try_for_each(|(n, t)| torchapprox::quantizers::check_state(&origin, n, t))
            })
        };
        tally(result, &case, &mut ok, &mut refused);
    }
    let peak = common::peak_rss().unwrap_or(0);
    assert!(peak < 1 << 30, "the worker's peak memory reached {} MiB", peak >> 20);
    println!("done: {ok} read, {refused} refused with one line, peak {} MiB", peak >> 20);
}

#[test]
fn safetensors_and_npy_mutations_never_crash() {
    let tmp = TempDir::new("fuzz-files");
    let state = tmp.0.join("state.safetensors");
    tch::manual_seed(3);
    let tensors = [
        ("fc1.weight", Tensor::randn([16, 8], (Kind::Float, Device::Cpu))),
        ("fc1.x_quantizer.alpha", Tensor::from_slice(&[2.2f32])),
        ("bn.num_batches_tracked", Tensor::from_slice(&[7i64])),
        ("fc2.bias", Tensor::randn([4], (Kind::Double, Device::Cpu))),
    ];
    Tensor::write_safetensors(&tensors, &state).unwrap();
    let st = std::fs::read(&state).unwrap();
    let header_end = 8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let npy = torchapprox::approx::Multiplier::exact().to_npy();
    let cases = mutations(&st, 0..header_end, 0xfeed, 300, 60)
        .into_iter()
        .map(|c| (c, "safetensors"))
        .chain(mutations(&npy, 0..128, 0xbeef, 200, 40).into_iter().map(|c| (c, "npy")));
    for (i, (c, ext)) in cases.enumerate() {
        std::fs::write(tmp.0.join(format!("case{i:03}.{ext}")), c).unwrap();
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "fuzz::files_fuzz_worker", "--ignored", "--nocapture", "--test-threads=1"])
        .env("TA_FUZZ_FILES", &tmp.0)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rfind(|l| l.starts_with("case ")).unwrap_or("");
    assert!(
        out.status.success(),
        "worker ended with {:?} at {last}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let done = stdout.lines().find(|l| l.starts_with("done: ")).expect("the worker did not finish");
    eprintln!("{done}");
}
