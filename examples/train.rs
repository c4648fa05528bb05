//! Quantization-aware training of an MLP or LeNet-5 on MNIST-format data, the crate's main job.
//!
//! ```sh
//! cargo run --release --example train                      # LeNet, 8-bit QAT, embedded 10k digits
//! cargo run --release --example train -- --mode baseline   # the float reference
//! cargo run --release --example train -- --bits 4 --layer fc3=minmax,minmax:8 --json
//! ```

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

mod common;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};
use torchapprox::approx::Multiplier;
use torchapprox::args::{check_f32, check_learning_rate, check_positive};
use torchapprox::checkpoint::{check_variables, load_checked, save_atomic};
use torchapprox::data::{count_correct, normalize, Mnist};
use torchapprox::distributed::DataParallel;
use torchapprox::files::check_output;
use torchapprox::import::{import_safetensors, ImportOptions};
use torchapprox::layers::{ApproxModule, Calibration, InferenceMode, QuantSpec};
use torchapprox::models::{Architecture, Net};
use torchapprox::quantizers::{
    check_bitwidth, ApproxQuantizer, Quantizer, QuantizerKind, RangeMode, StateFloors,
};
use torchapprox::torchscript::ScriptModel;

/// Train a quantization-aware MLP or LeNet-5 on MNIST with TorchApprox's quantizers.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Network: `mlp` (784-256-10) or `lenet` (LeNet-5).
    #[arg(long, default_value = "lenet")]
    model: Architecture,
    /// MNIST-format folder (train/t10k images/labels, plain or .gz); default: the embedded 10,000-digit subset.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Input normalisation: mean subtracted after pixel / 255.
    #[arg(long, default_value_t = 0.1307, allow_hyphen_values = true)]
    mean: f64,
    /// Input normalisation: divisor after subtracting the mean.
    #[arg(long, default_value_t = 0.3081)]
    std: f64,
    /// Passes over the training set; 0 only evaluates (with --load).
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Digits per optimisation step.
    #[arg(long, default_value_t = 64)]
    batch_size: i64,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Learning-rate schedule: `cosine` (decays to zero over the run, steadier final
    /// accuracy) or `constant`.
    #[arg(long, default_value = "cosine", value_parser = ["cosine", "constant"])]
    schedule: String,
    /// Optimiser: `adam` or `sgd` (momentum 0.9).
    #[arg(long, default_value = "adam", value_parser = ["adam", "sgd"])]
    optimizer: String,
    /// Seed of initialisation, shuffling and noise.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Inference mode of every layer: `baseline` (float), `quant` (QAT), `noise`, or `approx`
    /// (8-bit products from --multiplier's table, straight-through gradients).
    #[arg(long, default_value = "quant")]
    mode: InferenceMode,
    /// The multiplier of `--mode approx` (its table), or of `--mode noise` (its error's mean and
    /// std scaled to each layer's fan-in): `exact`, `truncated:K`, `mitchell`, `drum:K`, or a
    /// table file (`.npy` int32/int64 [256, 256], or 65,536 little-endian int32); `:wx` swaps operands.
    #[arg(long, value_name = "SPEC")]
    multiplier: Option<String>,
    /// Relative noise level of `--mode noise` without --multiplier (times the std of each layer's output).
    #[arg(long, default_value_t = 0.1)]
    noise_std: f64,
    /// Bits of every quantizer, 2..=16.
    #[arg(long, default_value_t = 8)]
    bits: u32,
    /// Bits of the activation quantizers (default: --bits).
    #[arg(long)]
    x_bits: Option<u32>,
    /// Bits of the weight quantizers (default: --bits).
    #[arg(long)]
    w_bits: Option<u32>,
    /// Range of MinMax activation quantizers: `running` (a moving average updated in
    /// training, frozen in evaluation, saved: predictions do not depend on the batch) or
    /// `batch` (each call's own range, as TorchApprox).
    #[arg(long, default_value = "running", value_parser = ["running", "batch"])]
    x_range: String,
    /// Digits per evaluation batch (results do not depend on it, except with --x-range batch).
    #[arg(long, default_value_t = 1000)]
    eval_batch_size: i64,
    /// Set every activation range (PACT alphas, MinMax running ranges, LSQ steps) from this
    /// many training batches, run in float before training; 0 keeps the initial values.
    #[arg(long, default_value_t = 0)]
    calibrate: usize,
    /// With --calibrate: use this percentile of the input magnitudes (mean over batches)
    /// instead of their maximum.
    #[arg(long, value_name = "P")]
    calibrate_percentile: Option<f64>,
    /// Initial alpha of PACT activation quantizers (PACT weights start at their range).
    #[arg(long, default_value_t = 2.2, allow_hyphen_values = true)]
    init_alpha: f64,
    /// Activation quantizer: `minmax`, `pact` or `lsq`.
    #[arg(long, default_value = "pact")]
    x_quant: QuantizerKind,
    /// Weight quantizer: `minmax`, `pact` or `lsq`.
    #[arg(long, default_value = "minmax")]
    w_quant: QuantizerKind,
    /// One MinMax weight scale per output channel.
    #[arg(long)]
    per_channel: bool,
    /// Override one layer: `NAME=X_KIND[:BITS],W_KIND[:BITS]` (bits per quantizer, e.g.
    /// `conv1=pact:8,minmax:4`); repeatable. In `NAME=X_KIND,W_KIND:BITS` the bits apply to
    /// both, as before.
    #[arg(long = "layer", value_name = "NAME=X[:B],W[:B]")]
    layers: Vec<String>,
    /// One layer's multiplier in `--mode approx` (or error model in `--mode noise`), instead
    /// of --multiplier's, e.g. `conv1=mul8s_1KVB`; repeatable.
    #[arg(long = "layer-multiplier", value_name = "NAME=SPEC")]
    layer_multipliers: Vec<String>,
    /// `auto` (CUDA when available), `cpu` or `cuda`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    device: String,
    /// Write the trained weights (and every alpha) here, atomically; must end in `.safetensors`.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Start from these weights (to resume, or to evaluate with `--epochs 0`).
    #[arg(long)]
    load: Option<PathBuf>,
    /// Start from a TorchScript model's weights and buffers, or a safetensors state dict
    /// (`safetensors.torch.save_file(model.state_dict(), ...)`), matched by name (`conv1.weight`, ...).
    #[arg(long, value_name = "MODEL.pt|STATE.safetensors", conflicts_with = "load")]
    init_from: Option<PathBuf>,
    /// libtorch's intra-op threads (0: libtorch's default). On a busy machine 1 is often fastest.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    threads: i64,
    /// Print exactly one JSON object on stdout at the end (progress goes to stderr).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    dist: common::DistArgs,
}

/// Parses `NAME=X_KIND[:BITS],W_KIND[:BITS]` against the model's layer names; the old form
/// `NAME=X_KIND,W_KIND:BITS` (no bits on the first) gives both quantizers those bits.
fn parse_override(arg: &str, arch: Architecture, base: QuantSpec) -> Result<(String, QuantSpec)> {
    let (name, (x_kind, xb), (w_kind, wb)) = common::parse_layer_quantizers(arg, "conv1=pact:8,minmax:4")?;
    if !arch.layer_names().contains(&name.as_str()) {
        bail!("--layer {arg:?}: unknown layer {name:?}; {arch} has {}", arch.layer_names().join(", "));
    }
    let (x_bits, w_bits) = match (xb, wb) {
        (None, Some(b)) => (Some(b), Some(b)),
        (xb, wb) => (xb.or(Some(base.x_bitwidth())), wb.or(Some(base.w_bitwidth()))),
    };
    Ok((name, QuantSpec { x_kind, w_kind, x_bits, w_bits, ..base }))
}

/// Share of correct predictions over a data set, in batches, without gradients.
/// Test accuracy; under torchrun each rank counts its share of the test set and the counts
/// are summed.
fn accuracy(
    net: &Net,
    images: &Tensor,
    labels: &Tensor,
    batch: i64,
    dp: Option<&mut DataParallel>,
) -> Result<f64> {
    let n = labels.size()[0];
    let correct = match dp {
        Some(dp) => {
            let idx = dp.shard(&Tensor::arange(n, (Kind::Int64, images.device())))?;
            let (x, y) =
                (images.index_select(0, &idx), labels.index_select(0, &idx.to_device(labels.device())));
            let mine = count_correct(&x, &y, batch, |x| net.f_forward_t(x, false))?;
            dp.sum_i64(mine)?
        }
        None => count_correct(images, labels, batch, |x| net.f_forward_t(x, false))?,
    };
    Ok(correct as f64 / n.max(1) as f64)
}

fn quantizer_report(q: &Quantizer) -> serde_json::Value {
    let scales = match q {
        Quantizer::MinMax(m) => m.scale_factors(),
        _ => vec![q.scale_factor()],
    };
    json!({
        "kind": q.kind().to_string(),
        "bits": q.bitwidth(),
        "scale_factor": q.scale_factor(),
        "scale_factors": if scales.len() > 1 { json!(scales) } else { serde_json::Value::Null },
        "alpha": q.alpha().map(|a| a.double_value(&[0])),
        "step_size": q.step_size().map(|s| s.double_value(&[0])),
    })
}

fn run(args: Args) -> Result<()> {
    common::set_threads(args.threads)?;
    // Under torchrun every rank trains the same network on its share of each batch.
    let (mut dp, device) = common::data_parallel(&args.dist, &args.device)?;
    let leader = dp.as_ref().map_or(true, |d| d.rank_and_size().0 == 0);
    let base = QuantSpec {
        x_kind: args.x_quant,
        w_kind: args.w_quant,
        bitwidth: check_bitwidth(args.bits).context("--bits")?,
        x_bits: args.x_bits.map(|b| check_bitwidth(b).context("--x-bits")).transpose()?,
        w_bits: args.w_bits.map(|b| check_bitwidth(b).context("--w-bits")).transpose()?,
        init_alpha: args.init_alpha,
        x_range: if args.x_range == "running" {
            RangeMode::Running { momentum: 0.9 }
        } else {
            RangeMode::Batch
        },
        per_channel: args.per_channel,
        mode: args.mode,
        noise_std: args.noise_std,
        rounded: true,
    };
    let overrides =
        args.layers.iter().map(|a| parse_override(a, args.model, base)).collect::<Result<Vec<_>>>()?;
    for (i, (name, _)) in overrides.iter().enumerate() {
        if overrides[..i].iter().any(|(n, _)| n == name) {
            bail!("--layer {name} is given twice: give each layer once");
        }
    }
    if args.batch_size < 1 {
        bail!("--batch-size must be at least 1, got {}", args.batch_size);
    }
    check_positive("--init-alpha", args.init_alpha)?;
    check_f32("--noise-std", args.noise_std)?;
    if args.eval_batch_size < 1 {
        bail!("--eval-batch-size must be at least 1, got {}", args.eval_batch_size);
    }
    check_learning_rate("--lr", args.lr)?;
    if let Some(path) = &args.save {
        if !path.to_string_lossy().ends_with(".safetensors") {
            bail!("--save {}: the checkpoint name must end in .safetensors", path.display());
        }
        let inputs: Vec<&Path> = args.load.iter().chain(&args.init_from).map(|p| p.as_path()).collect();
        check_output(path, &inputs).context("--save")?;
    }
    let layer_multipliers =
        common::parse_layer_multipliers(&args.layer_multipliers, "conv1=mul8s_1KVB", |arg, name| {
            if !args.model.layer_names().contains(&name) {
                bail!(
                    "--layer-multiplier {arg:?}: unknown layer {name:?}; {} has {}",
                    args.model,
                    args.model.layer_names().join(", ")
                );
            }
            Ok(())
        })?;
    if !layer_multipliers.is_empty()
        && !matches!(args.mode, InferenceMode::Approximate | InferenceMode::Noise)
    {
        bail!("--layer-multiplier applies to --mode approx or noise, not --mode {}", args.mode);
    }
    let multiplier = match (&args.multiplier, args.mode) {
        (Some(spec), InferenceMode::Approximate | InferenceMode::Noise) => Some(spec.parse::<Multiplier>()?),
        (None, InferenceMode::Approximate) if layer_multipliers.len() < args.model.layer_names().len() => {
            bail!("--mode approx needs --multiplier SPEC (e.g. exact, drum:4) for the layers without --layer-multiplier")
        }
        (Some(_), mode) => bail!("--multiplier applies to --mode approx or noise, not --mode {mode}"),
        (None, _) => None,
    };
    if args.mode == InferenceMode::Approximate {
        // Checked before the data loads; the network refuses the same when the multiplier is set.
        let specs = std::iter::once(base).chain(overrides.iter().map(|(_, s)| *s));
        let bits: Vec<u32> = specs.flat_map(|s| [s.x_bitwidth(), s.w_bitwidth()]).collect();
        if let Some(b) = bits.iter().find(|&&b| b > 8) {
            bail!("--mode approx reads 8-bit tables (operands of 2 to 8 bits): got {b} bits");
        }
    }
    // Only rank 0 speaks (and writes): the others would repeat it.
    let say = |line: String| match (leader, args.json) {
        (false, _) => {}
        (true, true) => eprintln!("{line}"),
        (true, false) => println!("{line}"),
    };
    let data = match &args.data {
        Some(dir) => Mnist::load_dir(dir)?,
        None => Mnist::embedded()?,
    };
    let train_x = normalize(&data.train_images, args.mean, args.std, device)?;
    let test_x = normalize(&data.test_images, args.mean, args.std, device)?;
    let train_y = data.train_labels.to_device(device);
    if args.epochs > 0 && data.train_labels.size()[0] == 0 {
        bail!("the training set is empty: {} has no training digits", data_name(&args.data));
    }
    if data.test_labels.size()[0] == 0 {
        bail!("the test set is empty: {} has no test digits to evaluate", data_name(&args.data));
    }

    tch::manual_seed(args.seed);
    let mut vs = nn::VarStore::new(device);
    let spec_for = |name: &str| overrides.iter().find(|(n, _)| n == name).map_or(base, |(_, s)| *s);
    let net = args.model.build(&vs.root(), spec_for)?;
    if args.mode == InferenceMode::Noise {
        // The multiplier's error distribution, scaled to each layer's fan-in (TorchApprox's noise model).
        net.set_error_model_of(multiplier.as_ref())?;
    } else {
        net.f_set_multiplier(multiplier.clone())?;
    }
    for (name, m) in &layer_multipliers {
        let layers = net.approx_layers();
        let (_, layer) = layers.iter().find(|(n, _)| n == name).expect("checked against the layer names");
        let q = layer.quant();
        if args.mode == InferenceMode::Noise {
            q.set_error_model(Some(m.metrics().layer_error(layer.fan_in())))?;
        } else {
            q.f_set_multiplier(Some(m.clone())).with_context(|| format!("--layer-multiplier {name}"))?;
        }
    }
    if let Some(path) = &args.load {
        load_checked(&mut vs, path)?;
    }
    if let Some(path) = &args.init_from {
        let report = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) {
            import_safetensors(&vs, path, &ImportOptions::default())?
        } else {
            ScriptModel::load(path, device)?.import_into(&vs)?
        };
        say(format!("initialised {} tensors from {}", report.copied.len(), path.display()));
    }
    if args.calibrate > 0 {
        let n = train_y.size()[0];
        let batches: Vec<Tensor> = (0..args.calibrate as i64)
            .map(|b| b * args.batch_size)
            .take_while(|&start| start < n)
            .map(|start| train_x.narrow(0, start, args.batch_size.min(n - start)))
            .collect();
        let method = match args.calibrate_percentile {
            Some(p) => Calibration::Percentile(p),
            None => Calibration::Max,
        };
        let ranges = net.calibrate(&batches, &|x| net.f_forward_t(x, false), method)?;
        let shown: Vec<String> = ranges.iter().map(|(n, r)| format!("{n} {r:.3}")).collect();
        say(format!("calibrated on {} batches: {}", batches.len(), shown.join(", ")));
    }
    if let Some(dp) = dp.as_mut() {
        // Same flags and network everywhere, then rank 0's variables everywhere.
        dp.check_same_setup(&vs, &format!("{args:?}"))?;
        dp.broadcast_variables(&vs)?;
        dp.sync_activation_ranges(true);
    }
    let mut opt = match args.optimizer.as_str() {
        "sgd" => nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, args.lr)?,
        _ => nn::Adam::default().build(&vs, args.lr)?,
    };
    // Alphas and step sizes stay at least the floor the forward uses (a step may overshoot).
    let floors = StateFloors::new(vs.variables());

    let n = train_y.size()[0];
    // n / b rounded up without n + b - 1, which overflows for a huge --batch-size.
    let steps = n / args.batch_size + i64::from(n % args.batch_size != 0);
    let show_bar = leader && !args.json && std::io::stderr().is_terminal();
    say(format!(
        "{} on {} train / {} test digits, mode {}, {} bits, x {} / w {}{}, {device:?}",
        args.model,
        n,
        data.test_labels.size()[0],
        args.mode,
        args.bits,
        args.x_quant,
        args.w_quant,
        if args.per_channel { " per channel" } else { "" }
    ));
    let started = Instant::now();
    let mut final_loss = f64::NAN;
    let mut epochs = Vec::new();
    for epoch in 1..=args.epochs {
        let t0 = Instant::now();
        let bar = if show_bar { ProgressBar::new(steps as u64) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")?
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{}", args.epochs));
        let mut order = Tensor::randperm(n, (Kind::Int64, device));
        if let Some(dp) = dp.as_mut() {
            // Rank 0's permutation everywhere: the ranks' generators may drift apart (noise
            // mode draws in proportion to each rank's share), the shares must not.
            let mut cpu = order.to_device(tch::Device::Cpu).contiguous();
            dp.group().broadcast_(&mut cpu, 0)?;
            order = cpu.to_device(device);
        }
        let (mut loss_sum, mut correct) =
            (Tensor::zeros([], (Kind::Float, device)), Tensor::zeros([], (Kind::Int64, device)));
        for step in 0..steps {
            let global =
                order.narrow(0, step * args.batch_size, args.batch_size.min(n - step * args.batch_size));
            if dp.as_ref().is_some_and(|d| global.size()[0] < d.rank_and_size().1) {
                // A last batch with fewer digits than ranks is skipped by every rank alike (the
                // decision is the global batch's): activation ranges and gradients are summed
                // over all ranks' passes, which must match one for one.
                bar.inc(1);
                continue;
            }
            // --batch-size is the global batch: each rank takes its contiguous share of it.
            let idx = match &dp {
                Some(dp) => dp.shard(&global)?,
                None => global.shallow_clone(),
            };
            if args.schedule == "cosine" {
                let done = ((epoch - 1) as i64 * steps + step) as f64 / (args.epochs as i64 * steps) as f64;
                opt.set_lr(args.lr * 0.5 * (1.0 + (std::f64::consts::PI * done).cos()));
            }
            let local = idx.size()[0];
            opt.zero_grad();
            if local > 0 {
                let (x, y) = (train_x.index_select(0, &idx), train_y.index_select(0, &idx));
                let logits = net.f_forward_t(&x, true)?;
                let loss = logits.cross_entropy_for_logits(&y);
                match dp.as_mut() {
                    // The gradient of the mean loss over the whole global batch, on every rank.
                    Some(dp) => dp.backward(&vs, &loss, local, global.size()[0])?,
                    None => loss.backward(),
                }
                loss_sum += loss.detach() * local as f64;
                correct += logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64);
                if show_bar && step % 10 == 0 {
                    bar.set_message(format!("loss {:.4}", loss.double_value(&[])));
                }
            }
            opt.step();
            floors.raise()?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let (mut loss_total, mut correct_total) = (loss_sum.double_value(&[]), correct.int64_value(&[]));
        if let Some(dp) = dp.as_mut() {
            let mut t = Tensor::from_slice(&[loss_total]);
            dp.group().allreduce_(&mut t, torchapprox::distributed::ReduceOp::Sum)?;
            loss_total = t.double_value(&[0]);
            correct_total = dp.sum_i64(correct_total)?;
        }
        final_loss = loss_total / n as f64;
        if !final_loss.is_finite() {
            bail!("training diverged in epoch {epoch} (loss {final_loss}); try a smaller --lr");
        }
        // The loss was computed before the epoch's last step: the weights themselves decide.
        check_variables(&vs, &format!("training diverged in epoch {epoch} (try a smaller --lr)"))?;
        let train_acc = correct_total as f64 / n as f64;
        let test_acc = accuracy(&net, &test_x, &data.test_labels, args.eval_batch_size, dp.as_mut())?;
        let secs = t0.elapsed().as_secs_f64();
        say(format!(
            "epoch {epoch:>2}/{}  loss {final_loss:.4}  train {:.2}%  test {:.2}%  {secs:.1}s",
            args.epochs,
            100.0 * train_acc,
            100.0 * test_acc
        ));
        epochs.push(json!({"epoch": epoch, "loss": final_loss, "train_accuracy": train_acc, "test_accuracy": test_acc, "seconds": secs}));
    }
    let test_accuracy = accuracy(&net, &test_x, &data.test_labels, args.eval_batch_size, dp.as_mut())?;
    if let Some(path) = args.save.as_ref().filter(|_| leader) {
        save_atomic(&vs, path)?;
        say(format!("saved {}", path.display()));
    }
    let seconds = started.elapsed().as_secs_f64();
    say(format!(
        "test accuracy {:.2}% ({} digits), {seconds:.1}s",
        100.0 * test_accuracy,
        data.test_labels.size()[0]
    ));
    if args.json && leader {
        let layers: Vec<_> = net
            .approx_layers()
            .into_iter()
            .map(|(name, l)| {
                let q = l.quant();
                json!({
                    "name": name,
                    "mode": q.mode().to_string(),
                    "bits": q.w_quantizer().bitwidth(),
                    "x_bits": q.x_quantizer().bitwidth(),
                    "w_bits": q.w_quantizer().bitwidth(),
                    "per_channel": matches!(q.w_quantizer(), Quantizer::MinMax(m) if m.per_channel()),
                    "multiplier": q.multiplier().map(|m| m.name().to_string()),
                    "error_model": q.error_model().map(|(mean, std)| json!({"mean": mean, "std": std})),
                    "x_quantizer": quantizer_report(q.x_quantizer()),
                    "w_quantizer": quantizer_report(q.w_quantizer()),
                    "fan_in": l.fan_in(),
                    "opcount": l.opcount(),
                })
            })
            .collect();
        let report = json!({
            "model": args.model.to_string(),
            "mode": args.mode.to_string(),
            "device": format!("{device:?}"),
            "bits": args.bits,
            "x_quant": args.x_quant.to_string(),
            "w_quant": args.w_quant.to_string(),
            "per_channel": args.per_channel,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "processes": dp.as_ref().map_or(1, |d| d.rank_and_size().1),
            "lr": args.lr,
            "optimizer": args.optimizer,
            "schedule": args.schedule,
            "seed": args.seed,
            "train_digits": n,
            "test_digits": data.test_labels.size()[0],
            "final_train_loss": if args.epochs > 0 { json!(final_loss) } else { serde_json::Value::Null },
            "test_accuracy": test_accuracy,
            "seconds": seconds,
            "train_seconds": epochs.iter().map(|e| e["seconds"].as_f64().unwrap_or(0.0)).sum::<f64>(),
            "gradient_sum_seconds": dp.as_ref().map_or(0.0, |d| d.gradient_seconds()),
            "overlap": dp.as_ref().is_some_and(|_| !args.dist.no_overlap),
            "per_epoch": epochs,
            "layers": layers,
            "multiplier": multiplier.as_ref().map(|m| {
                let e = m.metrics();
                json!({"name": m.name(), "error_rate": e.error_rate, "mean_absolute_error": e.mean_absolute_error,
                    "mred": e.mred, "worst_case_error": e.worst_case_error, "mean_error": e.mean_error, "error_std": e.error_std})
            }),
        });
        println!("{report}");
    }
    Ok(())
}

fn data_name(dir: &Option<PathBuf>) -> String {
    dir.as_ref().map_or("the embedded data set".into(), |d| d.display().to_string())
}

fn main() -> ExitCode {
    common::main(|| run(Args::parse()))
}
