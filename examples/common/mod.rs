//! What the example programs share: the `--device` choice, threads, `--layer` and
//! `--layer-multiplier` parsing, the torchrun set-up, the exit.
// Each example uses part of this module.
#![allow(dead_code)]

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use tch::Device;
use torchapprox::approx::Multiplier;
use torchapprox::distributed::{CudaBackend, DataParallel, DistEnv, ProcessGroup};
use torchapprox::quantizers::{check_bitwidth, QuantizerKind};

/// `auto` (CUDA when available), `cpu` or `cuda` (an error without a CUDA device).
pub fn pick_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" if torchapprox::cuda::f_is_available()? => Ok(Device::Cuda(0)),
        "cuda" => bail!("--device cuda: no CUDA device is available (libtorch sees none)"),
        _ => Ok(torchapprox::cuda::cuda_if_available()),
    }
}

/// The flags of runs under torchrun, shared by the programs that train.
#[derive(clap::Args, Debug, Clone)]
pub struct DistArgs {
    /// Under torchrun (or with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): seconds
    /// after which a collective or the rendezvous gives up, so a lost peer ends the run.
    #[arg(long, default_value_t = 60.0)]
    pub dist_timeout: f64,
    /// Under torchrun: gradients are summed over the ranks in buckets of this many MiB.
    #[arg(long, default_value_t = 25)]
    pub bucket_mb: usize,
    /// Under torchrun: sum gradients after the backward pass, not during it (by default
    /// c10d's Reducer overlaps the sums with the pass, as PyTorch's DDP does).
    #[arg(long)]
    pub no_overlap: bool,
    /// Under torchrun: what carries CUDA gradients between the ranks, `auto` (NCCL on CUDA
    /// where this build has it, else Gloo), `gloo` or `nccl` (the crate's `nccl` feature).
    #[arg(long, default_value = "auto", value_parser = ["auto", "gloo", "nccl"])]
    pub dist_backend: String,
}

/// Under torchrun (or with `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` set) and more
/// than one rank: the data-parallel group, joined within `--dist-timeout` seconds, summing
/// gradients in `--bucket-mb` MiB buckets through `--dist-backend`, and this rank's device
/// (`device_flag`, one GPU per rank). The flags are checked on one process too, so that a bad
/// value is seen before any cluster is booked.
pub fn data_parallel(flags: &DistArgs, device_flag: &str) -> Result<(Option<DataParallel>, Device)> {
    let (timeout_s, bucket_mb) = (flags.dist_timeout, flags.bucket_mb);
    let env = DistEnv::from_env()?;
    if !(timeout_s > 0.0 && timeout_s <= 600.0) {
        bail!("--dist-timeout must be more than 0 and at most 600 seconds, got {timeout_s}");
    }
    if !(1..=4096).contains(&bucket_mb) {
        bail!("--bucket-mb must be from 1 to 4096, got {bucket_mb}");
    }
    let device = rank_device(pick_device(device_flag)?, env.as_ref());
    let backend = match flags.dist_backend.as_str() {
        "auto" => CudaBackend::for_device(device),
        name => name.parse()?,
    };
    let dp = match &env {
        Some(e) if e.world_size > 1 => {
            let timeout = std::time::Duration::from_secs_f64(timeout_s);
            let group = ProcessGroup::init_with(e, timeout, backend)?;
            let mut dp = DataParallel::new(group, bucket_mb << 20);
            dp.set_overlap(!flags.no_overlap);
            Some(dp)
        }
        _ => None,
    };
    Ok((dp, device))
}

/// `device`, with one GPU per rank on its machine under torchrun: `LOCAL_RANK` picks it.
pub fn rank_device(device: Device, env: Option<&DistEnv>) -> Device {
    match (device, env) {
        (Device::Cuda(_), Some(e)) => Device::Cuda(e.local_rank as usize),
        (d, _) => d,
    }
}

/// The process's exit: success, or the error's chain on one line (C++ frames stripped, control
/// and bidi characters escaped) and failure.
pub fn exit(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let line = torchapprox::strip_backtrace(&format!("{e:#}"));
            eprintln!("error: {}", torchapprox::files::shown(&line));
            ExitCode::FAILURE
        }
    }
}

/// A program's `main`: a closed pipe (`... | head`) ends it quietly, as it does any Unix
/// tool, instead of a panic in `println!`; then `body` runs and [`exit`] reports its result.
pub fn main(body: impl FnOnce() -> Result<()>) -> ExitCode {
    // SAFETY: restores the default action of one signal before any thread starts; Rust's
    // runtime set SIGPIPE to ignored, which turns a closed stdout into a panic.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    exit(body())
}

/// `--threads N`: 0 keeps libtorch's choice; 1 up to four per core sets its intra-op pool.
pub fn set_threads(n: i64) -> Result<()> {
    torchapprox::args::check_threads("--threads", n)?;
    if n > 0 {
        tch::set_num_threads(n as i32);
    }
    Ok(())
}

/// One quantizer of a `--layer` value: its kind and, where given, its checked bits.
pub type KindBits = (QuantizerKind, Option<u32>);

/// Splits `--layer NAME=X_KIND[:BITS],W_KIND[:BITS]` into the name and both quantizers;
/// `example` completes the usage line.
pub fn parse_layer_quantizers(arg: &str, example: &str) -> Result<(String, KindBits, KindBits)> {
    let usage = || format!("--layer {arg:?}: expected NAME=X_KIND[:BITS],W_KIND[:BITS], e.g. {example}");
    let (name, rest) = arg.split_once('=').with_context(usage)?;
    let (x, w) = rest.split_once(',').with_context(usage)?;
    let part = |p: &str| -> Result<KindBits> {
        match p.split_once(':') {
            Some((k, b)) => {
                let b = b.parse::<u32>().with_context(|| format!("{}: bits {b:?}", usage()))?;
                Ok((k.parse()?, Some(check_bitwidth(b).with_context(|| format!("--layer {arg:?}"))?)))
            }
            None => Ok((p.parse()?, None)),
        }
    };
    Ok((name.to_string(), part(x)?, part(w)?))
}

/// `--layer-multiplier NAME=SPEC` values: each split (`example` completes the usage line),
/// its name checked by `check_name` (the network's layers, where they are known before
/// loading), given once, and its multiplier parsed.
pub fn parse_layer_multipliers(
    args: &[String],
    example: &str,
    check_name: impl Fn(&str, &str) -> Result<()>,
) -> Result<Vec<(String, Multiplier)>> {
    let mut out: Vec<(String, Multiplier)> = Vec::new();
    for arg in args {
        let (name, spec) = arg
            .split_once('=')
            .with_context(|| format!("--layer-multiplier {arg:?}: expected NAME=SPEC, e.g. {example}"))?;
        check_name(arg, name)?;
        if out.iter().any(|(n, _)| n == name) {
            bail!("--layer-multiplier {name} is given twice: give each layer once");
        }
        let m = spec.parse::<Multiplier>().with_context(|| format!("--layer-multiplier {arg:?}"))?;
        out.push((name.to_string(), m));
    }
    Ok(out)
}
