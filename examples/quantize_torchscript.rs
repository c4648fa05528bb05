//! Post-training weight quantization (and optional weight-only QAT) of a TorchScript model exported from PyTorch.
//!
//! ```sh
//! cargo run --release --example quantize_torchscript -- --model model.pt --bits 4 --per-channel --out model-w4.pt
//! ```

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

mod common;

use anyhow::{bail, Context, Result};
use clap::Parser;
use common::{embedded_mnist, pick_device};
use serde_json::json;
use tch::Device;
use torchapprox::checkpoint::check_destination;
use torchapprox::data::{normalize, Mnist};
use torchapprox::quantizers::check_bitwidth;
use torchapprox::torchscript::{FinetuneConfig, LayerReport, PtqConfig, ScriptModel};

/// Quantize the weights of a TorchScript model and report test accuracy before and after.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The TorchScript file (`torch.jit.script` or `torch.jit.trace`, then `.save`).
    #[arg(long)]
    model: PathBuf,
    /// Bits of every weight, 2..=16.
    #[arg(long, default_value_t = 8)]
    bits: u32,
    /// One MinMax scale per output channel instead of one per tensor.
    #[arg(long)]
    per_channel: bool,
    /// Override one layer's bits: `NAME=BITS` (`fc1` or `fc1.weight`); repeatable.
    #[arg(long = "layer", value_name = "NAME=BITS")]
    layers: Vec<String>,
    /// MNIST-format folder to measure accuracy on; default: the embedded 10,000-digit subset.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Input normalisation: mean subtracted after pixel / 255 (exported models usually carry their own).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    mean: f64,
    /// Input normalisation: divisor after subtracting the mean.
    #[arg(long, default_value_t = 1.0)]
    std: f64,
    /// Epochs of weight-only QAT fine-tuning on the training digits (0: post-training only).
    #[arg(long, default_value_t = 0)]
    finetune_epochs: usize,
    /// Learning rate of the fine-tuning.
    #[arg(long, default_value_t = 1e-4)]
    finetune_lr: f64,
    /// `auto` (CUDA when available), `cpu` or `cuda`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    device: String,
    /// Where to write the quantized TorchScript model (atomically; never the input file).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn parse_layer(arg: &str) -> Result<(String, u32)> {
    let (name, bits) = arg.split_once('=').with_context(|| format!("--layer {arg:?}: expected NAME=BITS"))?;
    let bits: u32 =
        bits.parse().with_context(|| format!("--layer {arg:?}: bits {bits:?} is not a number"))?;
    Ok((name.to_string(), check_bitwidth(bits).with_context(|| format!("--layer {arg:?}"))?))
}

fn layer_json(r: &LayerReport) -> serde_json::Value {
    json!({
        "name": r.name,
        "shape": r.shape,
        "bits": r.bits,
        "per_channel": r.per_channel,
        "scale_factors": r.scales,
        "max_abs_error": r.max_abs_error,
        // JSON has no infinity: an exact grid reports null.
        "sqnr_db": r.sqnr_db.is_finite().then_some(r.sqnr_db),
    })
}

fn run(args: Args) -> Result<()> {
    let ft = FinetuneConfig { epochs: args.finetune_epochs, lr: args.finetune_lr, ..Default::default() };
    ft.check().context("--finetune-lr")?;
    let config = PtqConfig {
        bits: check_bitwidth(args.bits).context("--bits")?,
        per_channel: args.per_channel,
        overrides: args.layers.iter().map(|l| parse_layer(l)).collect::<Result<_>>()?,
    };
    if let Some(out) = &args.out {
        let same = match (out.canonicalize(), args.model.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => out == &args.model,
        };
        if same {
            bail!("--out {} is the input model: choose another path", out.display());
        }
        check_destination(out).context("--out")?;
    }
    for (i, (name, _)) in config.overrides.iter().enumerate() {
        if config.overrides[..i].iter().any(|(n, _)| n == name) {
            bail!("--layer {name} is given twice: give each layer once");
        }
    }
    let device = pick_device(&args.device)?;
    let data = match &args.data {
        Some(dir) => Mnist::load_dir(dir)?,
        None => embedded_mnist()?,
    };
    let test_x = normalize(&data.test_images, args.mean, args.std, Device::Cpu)?;
    let mut model = ScriptModel::load(&args.model, device)?;
    let weights = model.quantizable_weights()?;
    let float_accuracy = model.accuracy(&test_x, &data.test_labels, 500)?;
    let say = |line: String| if args.json { eprintln!("{line}") } else { println!("{line}") };
    say(format!(
        "{}: {} quantizable weights, float test accuracy {:.2}%",
        args.model.display(),
        weights.len(),
        100.0 * float_accuracy
    ));
    let report = if args.finetune_epochs > 0 {
        let train_x = normalize(&data.train_images, args.mean, args.std, Device::Cpu)?;
        if std::io::stderr().is_terminal() {
            eprintln!("fine-tuning {} epoch(s) with {}-bit weights...", args.finetune_epochs, args.bits);
        }
        model.finetune_qat(&config, &train_x, &data.train_labels, ft)?
    } else {
        model.quantize_weights(&config)?
    };
    let quantized_accuracy = model.accuracy(&test_x, &data.test_labels, 500)?;
    for r in &report {
        say(format!(
            "  {:<16} {:>2} bits{}  SQNR {:>6.2} dB  max error {:.3e}",
            r.name,
            r.bits,
            if r.per_channel { " per channel" } else { "" },
            r.sqnr_db,
            r.max_abs_error
        ));
    }
    say(format!(
        "test accuracy: float {:.2}%, quantized {:.2}% ({} digits)",
        100.0 * float_accuracy,
        100.0 * quantized_accuracy,
        data.test_labels.size()[0]
    ));
    if let Some(out) = &args.out {
        model.save(out)?;
        say(format!("saved {}", out.display()));
    }
    if args.json {
        let report = json!({
            "model": args.model.display().to_string(),
            "device": format!("{device:?}"),
            "bits": args.bits,
            "per_channel": args.per_channel,
            "finetune_epochs": args.finetune_epochs,
            "test_digits": data.test_labels.size()[0],
            "float_accuracy": float_accuracy,
            "quantized_accuracy": quantized_accuracy,
            "out": args.out.as_ref().map(|p| p.display().to_string()),
            "layers": report.iter().map(layer_json).collect::<Vec<_>>(),
        });
        println!("{report}");
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", torchapprox::strip_backtrace(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
