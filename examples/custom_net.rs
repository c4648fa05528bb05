//! A network of your own with `approx_sequential`: build it, train it in float, calibrate its
//! activation ranges, fine-tune it quantization-aware, save it, and reload it into a fresh
//! network that must give the same logits.
//!
//! ```sh
//! cargo run --release --example custom_net                 # residual CNN, 8-bit, embedded digits
//! cargo run --release --example custom_net -- --x-bits 8 --w-bits 4 --qat-epochs 2
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

mod common;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use serde_json::json;
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};
use torchapprox::args::{check_learning_rate, check_positive};
use torchapprox::checkpoint::{check_destination, check_variables, load_checked, save_atomic};
use torchapprox::data::{count_correct, normalize, Mnist};
use torchapprox::layers::{
    approx_sequential, ApproxConvConfig, ApproxLinearConfig, ApproxModule, ApproxSequential, Calibration,
    InferenceMode, QuantSpec, SequentialBuilder,
};
use torchapprox::quantizers::{check_bitwidth, QuantizerKind, RangeMode, StateFloors};

/// Train a small residual CNN built with `approx_sequential` on MNIST, quantization-aware.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// MNIST-format folder; default: the embedded 10,000-digit subset.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Float training passes over the training set.
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Quantization-aware passes after calibration.
    #[arg(long, default_value_t = 1)]
    qat_epochs: usize,
    /// Digits per optimisation step.
    #[arg(long, default_value_t = 64, allow_hyphen_values = true)]
    batch_size: i64,
    /// Learning rate (Adam).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Use only the first N training digits (0: all).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    train_digits: i64,
    /// Bits of the activation quantizers (PACT).
    #[arg(long, default_value_t = 8)]
    x_bits: u32,
    /// Bits of the weight quantizers (MinMax, one scale per output channel).
    #[arg(long, default_value_t = 8)]
    w_bits: u32,
    /// Batches of training digits that set the PACT alphas after float training (0: keep
    /// TorchApprox's 2.2).
    #[arg(long, default_value_t = 8)]
    calibrate: usize,
    /// With --calibrate: use this percentile of the input magnitudes (mean over batches)
    /// instead of their maximum; better at 4 bits and below.
    #[arg(long, value_name = "P", allow_hyphen_values = true)]
    calibrate_percentile: Option<f64>,
    /// Where to save the trained variables (safetensors); reloaded into a fresh network.
    #[arg(long, default_value = "target/custom_net.safetensors")]
    out: PathBuf,
    /// Seed of initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// libtorch's CPU threads (0: libtorch's default); 1 is steadiest on a busy machine.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    threads: i64,
    /// `auto`, `cpu` or `cuda`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    dist: common::DistArgs,
}

/// A residual CNN: a stem, two residual blocks with BatchNorm, a strided convolution,
/// 2x2 average pooling and a classifier; PyTorch names (`layer1.0.conv1.weight`).
fn build(vs: &nn::VarStore, x_bits: u32, w_bits: u32) -> torchapprox::Result<ApproxSequential> {
    let quant = QuantSpec {
        x_bits: Some(x_bits),
        w_bits: Some(w_bits),
        w_kind: QuantizerKind::MinMax,
        per_channel: true,
        x_range: RangeMode::Batch,
        ..Default::default()
    };
    let conv = |stride, bias| conv3x3(stride, bias, quant);
    approx_sequential(vs.root())
        .conv2d("stem", 1, 16, 3, conv(1, false))
        .batch_norm2d("bn", 16)
        .relu()
        .seq("layer1", |s| s.residual("0", |b| block(b, 16, quant)).relu())
        .conv2d("down", 16, 32, 3, conv(2, true))
        .relu()
        .seq("layer2", |s| s.residual("0", |b| block(b, 32, quant)).relu())
        .avg_pool2d(2)
        .flatten()
        .linear("fc", 32 * 7 * 7, 10, ApproxLinearConfig { quant, ..Default::default() })
        .build()
}

fn conv3x3(stride: i64, bias: bool, quant: QuantSpec) -> ApproxConvConfig {
    ApproxConvConfig { stride, padding: 1, bias, quant, ..Default::default() }
}

/// A residual block's body: conv, BatchNorm, ReLU, conv, BatchNorm (`x +` it is the block).
fn block(b: SequentialBuilder<'_>, channels: i64, quant: QuantSpec) -> SequentialBuilder<'_> {
    b.conv2d("conv1", channels, channels, 3, conv3x3(1, false, quant))
        .batch_norm2d("bn1", channels)
        .relu()
        .conv2d("conv2", channels, channels, 3, conv3x3(1, false, quant))
        .batch_norm2d("bn2", channels)
}

fn accuracy(net: &ApproxSequential, x: &Tensor, y: &Tensor) -> Result<f64> {
    let correct = count_correct(x, y, 500, |b| net.f_forward_t(b, false))?;
    Ok(100.0 * correct as f64 / y.size()[0] as f64)
}

fn run(args: Args) -> Result<()> {
    check_bitwidth(args.x_bits).context("--x-bits")?;
    check_bitwidth(args.w_bits).context("--w-bits")?;
    ensure!(args.batch_size > 0, "--batch-size must be at least 1, got {}", args.batch_size);
    ensure!(args.train_digits >= 0, "--train-digits must be 0 (all) or more, got {}", args.train_digits);
    check_positive("--lr", args.lr)?;
    check_learning_rate("--lr", args.lr)?;
    if let Some(p) = args.calibrate_percentile {
        ensure!(p > 0.0 && p <= 100.0, "--calibrate-percentile must be in (0, 100], got {p}");
    }
    check_destination(&args.out)?;
    common::set_threads(args.threads)?;
    // Under torchrun every rank trains on its share of each global batch of --batch-size;
    // rank 0 alone speaks and writes.
    let (mut dp, device) = common::data_parallel(&args.dist, &args.device)?;
    let leader = dp.as_ref().map_or(true, |d| d.rank_and_size().0 == 0);
    let processes = dp.as_ref().map_or(1, |d| d.rank_and_size().1);
    // Each rank's share of a batch holds at least two digits: BatchNorm in training needs two.
    ensure!(
        processes == 1 || args.batch_size >= 2 * processes,
        "--batch-size is the global batch: with {processes} ranks it must be at least {}, got {}",
        2 * processes,
        args.batch_size
    );
    let data = match &args.data {
        Some(dir) => Mnist::load_dir(dir)?,
        None => Mnist::embedded()?,
    };
    let n_test = data.test_labels.size()[0];
    let data = if args.train_digits > 0 { data.subset(args.train_digits, n_test) } else { data };
    let (tx, ty) = (normalize(&data.train_images, 0.0, 1.0, device)?, data.train_labels.to_device(device));
    let (vx, vy) = (normalize(&data.test_images, 0.0, 1.0, device)?, data.test_labels.to_device(device));
    let n = tx.size()[0];
    ensure!(n > 0 && n_test > 0, "the data needs training and test digits, got {n} and {n_test}");

    tch::manual_seed(args.seed);
    let vs = nn::VarStore::new(device);
    let net = build(&vs, args.x_bits, args.w_bits)?;
    let say = |s: String| {
        if leader && !args.json {
            println!("{s}");
        }
    };
    if let Some(dp) = dp.as_mut() {
        // Same flags and network everywhere, then rank 0's variables everywhere.
        let flags = format!("{args:?}");
        dp.check_same_setup(&vs, &flags)?;
        dp.broadcast_variables(&vs)?;
        dp.sync_activation_ranges(true);
    }
    say(format!("{} Approx layers, {} variables", net.approx_layers().len(), vs.variables().len()));

    let mut opt = nn::Adam::default().build(&vs, args.lr)?;
    // Alphas stay at least the floor the forward uses (a step may overshoot).
    let floors = StateFloors::new(vs.variables());
    let mut losses = Vec::new();
    let mut train = |epochs: usize, what: &str| -> Result<f64> {
        for epoch in 1..=epochs {
            let mut order = Tensor::randperm(n, (Kind::Int64, device));
            if let Some(dp) = dp.as_mut() {
                // Rank 0's permutation everywhere, whatever the ranks' generators did.
                let mut cpu = order.to_device(tch::Device::Cpu).contiguous();
                dp.group().broadcast_(&mut cpu, 0)?;
                order = cpu.to_device(device);
            }
            let world = dp.as_ref().map_or(1, |d| d.rank_and_size().1);
            let (mut total, mut steps) = (0.0, 0);
            for s in 0..(n + args.batch_size - 1) / args.batch_size {
                let global =
                    order.narrow(0, s * args.batch_size, args.batch_size.min(n - s * args.batch_size));
                let len = global.size()[0];
                if world > 1 && len < 2 * world {
                    // Every rank alike skips a last batch whose shares would hold fewer than two.
                    continue;
                }
                let idx = match dp.as_ref() {
                    Some(dp) => dp.shard(&global)?,
                    None => global,
                };
                let logits = net.f_forward_t(&tx.index_select(0, &idx), true)?;
                let loss = logits.cross_entropy_for_logits(&ty.index_select(0, &idx));
                opt.zero_grad();
                let mut value = loss.double_value(&[]);
                match dp.as_mut() {
                    // The gradient and the loss of the whole global batch, on every rank.
                    Some(dp) => {
                        dp.backward(&vs, &loss, idx.size()[0], len)?;
                        let mut t = Tensor::from_slice(&[value * idx.size()[0] as f64 / len as f64]);
                        dp.group().allreduce_(&mut t, torchapprox::distributed::ReduceOp::Sum)?;
                        value = t.double_value(&[0]);
                    }
                    None => loss.backward(),
                }
                opt.step();
                floors.raise()?;
                total += value;
                steps += 1;
            }
            if let Some(dp) = dp.as_mut() {
                // BatchNorm statistics saw each rank's shares: rank 0's, everywhere.
                dp.broadcast_variables(&vs)?;
            }
            let loss = total / steps.max(1) as f64;
            ensure!(
                loss.is_finite(),
                "{what} training diverged in epoch {epoch} (loss {loss}): try a smaller --lr"
            );
            // The loss predates the epoch's last step: the weights themselves decide.
            check_variables(&vs, &format!("{what} training diverged in epoch {epoch} (try a smaller --lr)"))?;
            losses.push(loss);
            say(format!("{what} epoch {epoch}: loss {loss:.4}"));
        }
        accuracy(&net, &vx, &vy)
    };

    // Float first: calibration needs the trained network's activation ranges.
    net.set_mode(InferenceMode::Baseline);
    let float = train(args.epochs, "float")?;
    net.set_mode(InferenceMode::Quantized);
    let uncalibrated = accuracy(&net, &vx, &vy)?;
    say(format!("float {float:.2}%; quantized with alpha 2.2: {uncalibrated:.2}%"));
    let (calibration, calibrated) = if args.calibrate > 0 {
        let batches: Vec<Tensor> = (0..args.calibrate as i64)
            .map(|b| b * args.batch_size)
            .take_while(|&s| s < n)
            .map(|s| tx.narrow(0, s, args.batch_size.min(n - s)))
            .collect();
        let method = args.calibrate_percentile.map_or(Calibration::Max, Calibration::Percentile);
        let ranges = net.calibrate(&batches, &|b| net.f_forward_t(b, false), method)?;
        let acc = accuracy(&net, &vx, &vy)?;
        say(format!("calibrated {} input ranges on {} batches: {acc:.2}%", ranges.len(), batches.len()));
        (ranges, Some(acc))
    } else {
        (Vec::new(), None)
    };
    let quantized = train(args.qat_epochs, "quantization-aware")?;
    say(format!(
        "test accuracy {quantized:.2}% with {}-bit activations and {}-bit weights",
        args.x_bits, args.w_bits
    ));

    if !leader {
        // Rank 0 writes and checks the file; the others are done.
        return Ok(());
    }
    save_atomic(&vs, &args.out)?;
    let mut vs2 = nn::VarStore::new(device);
    let reloaded = build(&vs2, args.x_bits, args.w_bits)?;
    load_checked(&mut vs2, &args.out)?;
    reloaded.set_mode(InferenceMode::Quantized);
    let probe = vx.narrow(0, 0, 100.min(vx.size()[0]));
    let (a, b) = tch::no_grad(|| -> torchapprox::Result<_> {
        Ok((net.f_forward_t(&probe, false)?, reloaded.f_forward_t(&probe, false)?))
    })?;
    let max_diff = (a - b).abs().max().double_value(&[]);
    ensure!(max_diff == 0.0, "the reloaded network's logits differ by {max_diff}");
    say(format!("saved {} and reloaded it into a new network: identical logits", args.out.display()));
    if args.json {
        println!(
            "{}",
            json!({
                "x_bits": args.x_bits,
                "w_bits": args.w_bits,
                "float_accuracy": float,
                "uncalibrated_accuracy": uncalibrated,
                "calibrated_accuracy": calibrated,
                "calibrated": calibration.iter().map(|(n, r)| json!({"layer": n, "range": r})).collect::<Vec<_>>(),
                "accuracy": quantized,
                "losses": losses,
                "saved": args.out,
                "reload_max_diff": max_diff,
                "device": format!("{device:?}"),
                "processes": processes,
            })
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    common::main(|| run(Args::parse()))
}
