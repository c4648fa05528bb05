//! Quantization of a TorchScript model exported from PyTorch: weights only (post-training, optional
//! weight-only QAT), or with `--x-quant` every Linear and Conv2d rewritten into a quantized layer
//! (inputs and weights), calibrated and fine-tuned, saved as plain TorchScript.
//!
//! ```sh
//! cargo run --release --example quantize_torchscript -- --model model.pt --bits 4 --per-channel --out model-w4.pt
//! cargo run --release --example quantize_torchscript -- --model resnet.pt --x-quant pact --calibrate 8 \
//!     --bits 4 --per-channel --finetune-epochs 1 --finetune-lr 1e-3 --out resnet-q4.pt
//! ```

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

mod common;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use tch::Device;
use torchapprox::approx::Multiplier;
use torchapprox::data::{normalize_channels, DataSet, LoadOptions};
use torchapprox::files::check_output;
use torchapprox::layers::QuantSpec;
use torchapprox::quantizers::{check_bitwidth, QuantizerKind, RangeMode};
use torchapprox::torchscript::{
    FinetuneConfig, LayerReport, PtqConfig, RewriteConfig, RewriteReport, ScriptModel,
};

/// Quantize the weights of a TorchScript model and report test accuracy before and after.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The TorchScript file (`torch.jit.script` or `torch.jit.trace`, then `.save`).
    #[arg(long)]
    model: PathBuf,
    /// Bits of every weight (and, with --x-quant, every input), 2..=16.
    #[arg(long, default_value_t = 8)]
    bits: u32,
    /// Input quantizer of every Linear and Conv2d: `pact`, `minmax`, or `none` (weights only,
    /// in place). Anything but `none` rewrites the layers' forward inside the model.
    #[arg(long, default_value = "none", value_parser = ["none", "pact", "minmax"])]
    x_quant: String,
    /// Weight quantizer with --x-quant: `minmax` or `pact`.
    #[arg(long, default_value = "minmax")]
    w_quant: QuantizerKind,
    /// Bits of the inputs with --x-quant (default: --bits).
    #[arg(long)]
    x_bits: Option<u32>,
    /// Bits of the weights with --x-quant (default: --bits).
    #[arg(long)]
    w_bits: Option<u32>,
    /// One MinMax scale per output channel instead of one per tensor.
    #[arg(long)]
    per_channel: bool,
    /// Range of MinMax inputs in the rewrite: `running` (a moving average kept in
    /// `x_quantizer.running_max`, set by --calibrate and frozen in evaluation) or `batch`
    /// (each call's own, so a prediction depends on the rest of its batch).
    #[arg(long, default_value = "running", value_parser = ["running", "batch"])]
    x_range: String,
    /// Refuse the model when any layer or functional call would stay in float, instead of
    /// rewriting the rest and listing it.
    #[arg(long)]
    strict: bool,
    /// With --x-quant: `quantized` (exact integer products) or `approx` (every product read
    /// from --multiplier's table, in evaluation and fine-tuning, straight-through gradients).
    #[arg(long, default_value = "quantized", value_parser = ["quantized", "approx"])]
    mode: String,
    /// The multiplier of `--mode approx`: `exact`, `drum:4`, an EvoApprox name such as
    /// `mul8s_1KVB` (`:wx` for weight x activation), or a .npy/.bin table file.
    #[arg(long)]
    multiplier: Option<String>,
    /// One layer's multiplier in `--mode approx`, instead of --multiplier's, e.g.
    /// `layer1.0.conv1=mul8s_1L2J`; repeatable.
    #[arg(long = "layer-multiplier", value_name = "NAME=SPEC")]
    layer_multipliers: Vec<String>,
    /// Override one layer: `NAME=BITS` (weights only; `fc1` or `fc1.weight`), or with --x-quant
    /// `NAME=X_KIND[:BITS],W_KIND[:BITS]` (e.g. `fc=minmax:8,minmax:8`); repeatable.
    #[arg(long = "layer", value_name = "NAME=SPEC")]
    layers: Vec<String>,
    /// With --x-quant: set every PACT alpha and running MinMax range from this many training batches (of 64) before
    /// fine-tuning or evaluation; 0 keeps alpha = 2.2.
    #[arg(long, default_value_t = 0)]
    calibrate: usize,
    /// The data: an MNIST folder (IDX files), a CIFAR-10/100 binary folder, an image folder
    /// (`train/` and `val/`, or one subfolder per class; PNG/JPEG) or a `.safetensors` file
    /// (`images`, `labels`); default: the embedded 10,000 MNIST digits.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Height and width of image-folder images (shorter side resized to size x 256/224, then
    /// center cropped).
    #[arg(long, default_value_t = 224)]
    image_size: i64,
    /// At most this many images per split, spread evenly over it (every k-th).
    #[arg(long)]
    limit: Option<i64>,
    /// Input normalisation: mean subtracted after pixel / 255, one value or one per channel
    /// (`0.485,0.456,0.406` for ImageNet models); exported models may carry their own.
    #[arg(long, default_value = "0", value_delimiter = ',', allow_hyphen_values = true)]
    mean: Vec<f64>,
    /// Input normalisation: divisor after subtracting the mean, one value or one per channel.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    std: Vec<f64>,
    /// Fine-tune on random crops (images zero-padded by 1/8 of their height) and horizontal flips.
    #[arg(long)]
    augment: bool,
    /// Epochs of QAT fine-tuning on the training digits (0: post-training only): weight-only,
    /// or with --x-quant of every parameter and alpha of the rewritten model.
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
    /// libtorch's intra-op threads (0: libtorch's default). On a busy machine 1 is often fastest.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    threads: i64,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    dist: common::DistArgs,
}

fn parse_layer(arg: &str) -> Result<(String, u32)> {
    let (name, bits) = arg.split_once('=').with_context(|| format!("--layer {arg:?}: expected NAME=BITS"))?;
    let bits: u32 =
        bits.parse().with_context(|| format!("--layer {arg:?}: bits {bits:?} is not a number"))?;
    Ok((name.to_string(), check_bitwidth(bits).with_context(|| format!("--layer {arg:?}"))?))
}

/// `NAME=X_KIND[:BITS],W_KIND[:BITS]` over `base`.
fn parse_rewrite_layer(arg: &str, base: QuantSpec) -> Result<(String, QuantSpec)> {
    let (name, (x_kind, xb), (w_kind, wb)) = common::parse_layer_quantizers(arg, "fc=minmax:8,minmax:8")?;
    let (x_bits, w_bits) = (xb.or(base.x_bits), wb.or(base.w_bits));
    Ok((name, QuantSpec { x_kind, w_kind, x_bits, w_bits, ..base }))
}

fn rewrite_json(model: &ScriptModel, report: &RewriteReport) -> Result<Vec<serde_json::Value>> {
    let alphas = model.alphas()?;
    Ok(report
        .layers
        .iter()
        .zip(alphas)
        .map(|(l, (_, xa, wa))| {
            json!({
                "name": l.name,
                "op": match l.op {
                    torchapprox::torchscript::LayerOp::Linear => "linear",
                    torchapprox::torchscript::LayerOp::Attention { .. } => "attention",
                    _ => "conv2d",
                },
                "x_quant": l.spec.x_kind.to_string(),
                "w_quant": l.spec.w_kind.to_string(),
                "x_bits": l.spec.x_bitwidth(),
                "w_bits": l.spec.w_bitwidth(),
                "per_channel": l.spec.per_channel,
                "x_alpha": xa,
                "w_alpha": wa,
                "calls": l.calls,
            })
        })
        .collect())
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
        "zeroed": r.zeroed,
    })
}

fn run(args: Args) -> Result<()> {
    common::set_threads(args.threads)?;
    let mut ft = FinetuneConfig { epochs: args.finetune_epochs, lr: args.finetune_lr, ..Default::default() };
    ft.check().context("--finetune-lr")?;
    let bits = check_bitwidth(args.bits).context("--bits")?;
    let rewrite = args.x_quant != "none";
    if !rewrite && (args.calibrate > 0 || args.x_bits.is_some() || args.w_bits.is_some() || args.strict) {
        bail!("--calibrate, --x-bits, --w-bits and --strict need --x-quant pact or minmax");
    }
    if args.limit.is_some_and(|n| n < 1) {
        bail!("--limit must be at least 1 image per split, got {}", args.limit.unwrap_or(0));
    }
    if !(1..=4096).contains(&args.image_size) {
        bail!("--image-size must be from 1 to 4096 pixels, got {}", args.image_size);
    }
    let approx = args.mode == "approx";
    if !rewrite && approx {
        bail!("--mode approx needs --x-quant pact or minmax (it runs the rewritten layers' products through a table)");
    }
    if !approx && (args.multiplier.is_some() || !args.layer_multipliers.is_empty()) {
        bail!("--multiplier and --layer-multiplier apply to --mode approx");
    }
    if approx && args.multiplier.is_none() && args.layer_multipliers.is_empty() {
        bail!("--mode approx needs --multiplier SPEC (e.g. exact, drum:4, mul8s_1KVB) or --layer-multiplier");
    }
    let multiplier =
        args.multiplier.as_ref().map(|m| m.parse::<Multiplier>().context("--multiplier")).transpose()?;
    // Layer names are known once the model is rewritten; set_layer_multiplier checks them.
    let layer_multipliers =
        common::parse_layer_multipliers(&args.layer_multipliers, "layer1.0.conv1=mul8s_1KVB", |_, _| Ok(()))?;
    let base = QuantSpec {
        x_kind: if args.x_quant == "minmax" { QuantizerKind::MinMax } else { QuantizerKind::Pact },
        w_kind: args.w_quant,
        bitwidth: bits,
        x_bits: Some(check_bitwidth(args.x_bits.unwrap_or(bits)).context("--x-bits")?),
        w_bits: Some(check_bitwidth(args.w_bits.unwrap_or(bits)).context("--w-bits")?),
        per_channel: args.per_channel,
        x_range: if args.x_range == "running" {
            RangeMode::Running { momentum: 0.9 }
        } else {
            RangeMode::Batch
        },
        ..QuantSpec::default()
    };
    let (config, rewrite_config) = if rewrite {
        let overrides =
            args.layers.iter().map(|l| parse_rewrite_layer(l, base)).collect::<Result<Vec<_>>>()?;
        (PtqConfig::default(), RewriteConfig { default: base, overrides, strict: args.strict })
    } else {
        let overrides = args.layers.iter().map(|l| parse_layer(l)).collect::<Result<Vec<_>>>()?;
        (PtqConfig { bits, per_channel: args.per_channel, overrides }, RewriteConfig::default())
    };
    let names: Vec<&str> = if rewrite {
        rewrite_config.overrides.iter().map(|(n, _)| n.as_str()).collect()
    } else {
        config.overrides.iter().map(|(n, _)| n.as_str()).collect()
    };
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            bail!("--layer {name} is given twice: give each layer once");
        }
    }
    if let Some(out) = &args.out {
        check_output(out, &[&args.model]).context("--out")?;
    }
    // Under torchrun every rank fine-tunes on its share of each batch; rank 0 alone speaks
    // and writes. --finetune-epochs' --batch-size (64) is the global batch.
    let (dp, device) = common::data_parallel(&args.dist, &args.device)?;
    let leader = dp.as_ref().map_or(true, |d| d.rank_and_size().0 == 0);
    let processes = dp.as_ref().map_or(1, |d| d.rank_and_size().1);
    let options = LoadOptions { size: [args.image_size, args.image_size], ..Default::default() };
    let mut data = match &args.data {
        Some(path) => DataSet::load(path, &options)?,
        None => DataSet::from_mnist(torchapprox::data::Mnist::embedded()?, "the embedded digits"),
    };
    if let Some(n) = args.limit {
        data.train = data.train.spread(n)?;
        data.test = data.test.spread(n)?;
    }
    if args.augment {
        // An eighth of the image's height: 4 pixels for CIFAR's 32x32.
        ft.augment_pad = (data.train.images.size()[2] / 8).max(1);
    }
    let test_x = normalize_channels(&data.test.images, &args.mean, &args.std, Device::Cpu)?;
    let mut model = ScriptModel::load(&args.model, device)?;
    model.set_data_parallel(dp);
    let weights = model.quantizable_weights()?;
    // Labels the model cannot predict are the data's fault: say so before any accuracy.
    let classes = model.logits(&test_x.narrow(0, 0, 1).to_device(device))?.size()[1];
    data.check_classes(classes)?;
    let float_accuracy = model.accuracy(&test_x, &data.test.labels, 500)?;
    let say = |line: String| match (leader, args.json) {
        (false, _) => {}
        (true, true) => eprintln!("{line}"),
        (true, false) => println!("{line}"),
    };
    say(format!(
        "{}: {} quantizable weights, float test accuracy {:.2}%",
        args.model.display(),
        weights.len(),
        100.0 * float_accuracy
    ));
    let train_x = || normalize_channels(&data.train.images, &args.mean, &args.std, Device::Cpu);
    let (layers_json, left) = if rewrite {
        let report = model.quantize_layers(&rewrite_config)?;
        if args.calibrate > 0 {
            model.calibrate(&train_x()?, args.calibrate, 64)?;
        }
        // Set before fine-tuning, so that fine-tuning retrains to the multiplier.
        if let Some(m) = &multiplier {
            model.set_multiplier(Some(m))?;
        }
        for (name, m) in &layer_multipliers {
            model
                .set_layer_multiplier(name, Some(m))
                .with_context(|| format!("--layer-multiplier {name}"))?;
        }
        if args.finetune_epochs > 0 {
            if leader && std::io::stderr().is_terminal() {
                eprintln!("fine-tuning {} epoch(s) of the rewritten model...", args.finetune_epochs);
            }
            model.finetune(&train_x()?, &data.train.labels, ft)?;
        }
        for l in &report.layers {
            say(format!(
                "  {:<20} x {}:{} w {}:{}{}{}",
                l.name,
                l.spec.x_kind,
                l.spec.x_bitwidth(),
                l.spec.w_kind,
                l.spec.w_bitwidth(),
                if l.spec.per_channel { " per channel" } else { "" },
                if l.calls > 1 { format!(" (called {} times)", l.calls) } else { String::new() }
            ));
        }
        for l in &report.left_in_float {
            say(format!("  left in float: {l}"));
        }
        (rewrite_json(&model, &report)?, report.left_in_float)
    } else {
        let report = if args.finetune_epochs > 0 {
            if leader && std::io::stderr().is_terminal() {
                eprintln!("fine-tuning {} epoch(s) with {}-bit weights...", args.finetune_epochs, args.bits);
            }
            model.finetune_qat(&config, &train_x()?, &data.train.labels, ft)?
        } else {
            model.quantize_weights(&config)?
        };
        for r in &report {
            say(format!(
                "  {:<16} {:>2} bits{}  SQNR {:>6.2} dB  max error {:.3e}",
                r.name,
                r.bits,
                if r.per_channel { " per channel" } else { "" },
                r.sqnr_db,
                r.max_abs_error
            ));
            if leader && r.collapsed() {
                // Warnings go to stderr, so that --json keeps one object on stdout.
                eprintln!(
                    "warning: {}: {:.1}% of its non-zero weights quantize to 0 (an outlier set the range); its SQNR hides that",
                    torchapprox::files::shown(&r.name),
                    100.0 * r.zeroed
                );
            }
        }
        (report.iter().map(layer_json).collect(), Vec::new())
    };
    let quantized_accuracy = model.accuracy(&test_x, &data.test.labels, 500)?;
    say(format!(
        "test accuracy: float {:.2}%, {} {:.2}% ({} test images)",
        100.0 * float_accuracy,
        if approx { "approximate" } else { "quantized" },
        100.0 * quantized_accuracy,
        data.test.labels.size()[0]
    ));
    if let Some(out) = args.out.as_ref().filter(|_| leader) {
        model.save(out)?;
        say(format!("saved {}", out.display()));
    }
    if args.json && leader {
        let report = json!({
            "model": args.model.display().to_string(),
            "device": format!("{device:?}"),
            "bits": args.bits,
            "x_quant": args.x_quant,
            "per_channel": args.per_channel,
            "calibrate": args.calibrate,
            "mode": args.mode,
            "multipliers": model.multipliers().iter().map(|(l, m)| json!({"layer": l, "multiplier": m.name()})).collect::<Vec<_>>(),
            "finetune_epochs": args.finetune_epochs,
            "processes": processes,
            "test_digits": data.test.labels.size()[0],
            "data": {"format": data.format, "source": data.source.display().to_string(),
                "train": data.train.len(), "test": data.test.len(), "classes": data.classes},
            "float_accuracy": float_accuracy,
            "quantized_accuracy": quantized_accuracy,
            "out": args.out.as_ref().map(|p| p.display().to_string()),
            "layers": layers_json,
            "left_in_float": left,
        });
        println!("{report}");
    }
    Ok(())
}

fn main() -> ExitCode {
    common::main(|| run(Args::parse()))
}
