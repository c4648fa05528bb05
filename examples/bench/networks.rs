//! Whole networks, quantized against float: TorchScript models rewritten by
//! `quantize_layers` (evaluation and a training step) and the crate's own ResNet-18.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use torchapprox::layers::{approx_sequential, ApproxConvConfig, InferenceMode, QuantSpec, SequentialBuilder};
use torchapprox::torchscript::{RewriteConfig, ScriptModel};

/// The torchvision models of the `torchscript[]` rows, as scripts/checks/vision_models.py
/// `bench` writes them (random weights, fixed seed, 224x224 inputs).
pub const TORCHSCRIPT_MODELS: [&str; 6] =
    ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "vgg11_bn", "alexnet"];

/// Median seconds of `a` and of `b`, timed in alternating rounds after two warm-up calls
/// each, so that drift on a shared machine hits both alike (and TorchScript has optimized).
pub fn alternate(
    rounds: usize,
    a: &mut dyn FnMut() -> Result<()>,
    b: &mut dyn FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    for _ in 0..2 {
        a()?;
        b()?;
    }
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let t0 = Instant::now();
        f()?;
        Ok(t0.elapsed().as_secs_f64())
    };
    for _ in 0..rounds {
        ta.push(timed(a)?);
        tb.push(timed(b)?);
    }
    Ok((median(ta), median(tb)))
}

/// The median of `v` (the upper one of an even count); `v` is not empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One SGD step of a TorchScript model on `(x, y)`: forward in training mode, cross-entropy,
/// backward, then `p -= 1e-4 * grad` (an in-place update, as an optimizer's).
fn script_step(model: &ScriptModel, params: &[Tensor], x: &Tensor, y: &Tensor) -> Result<()> {
    let loss = model.logits(x)?.f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0)?;
    loss.f_backward()?;
    tch::no_grad(|| -> Result<()> {
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = p.shallow_clone().f_sub_(&g.f_mul_scalar(1e-4)?)?;
                let _ = g.f_zero_()?;
            }
        }
        Ok(())
    })
}

/// `torchscript[]` rows: each model of `dir` in float and rewritten (8-bit PACT inputs,
/// MinMax weights, calibrated on the batch), at batch 8 on the current thread count.
pub fn torchscript_rows(dir: &Path, threads: i32, device: Device) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for name in TORCHSCRIPT_MODELS {
        let path = dir.join(format!("{name}.pt"));
        let float = ScriptModel::load(&path, device)
            .with_context(|| format!("{} (run scripts/bench.sh)", path.display()))?;
        let mut quant = ScriptModel::load(&path, device)?;
        tch::manual_seed(0);
        let x = Tensor::f_randn([8, 3, 224, 224], (Kind::Float, device))?;
        let y = Tensor::f_randint(1000, [8], (Kind::Int64, device))?;
        let report = quant.quantize_layers(&RewriteConfig::default())?;
        quant.calibrate(&x, 1, 8)?;
        let (float_s, quantized_s) = alternate(
            5,
            &mut || tch::no_grad(|| float.forward(&x).map(drop)).map_err(Into::into),
            &mut || tch::no_grad(|| quant.forward(&x).map(drop)).map_err(Into::into),
        )?;
        let (mut float, mut quant) = (float, quant);
        float.set_training(true)?;
        quant.set_training(true)?;
        let (pf, pq): (Vec<Tensor>, Vec<Tensor>) = (
            float.parameters()?.into_iter().map(|(_, t)| t).collect(),
            quant.parameters()?.into_iter().map(|(_, t)| t).collect(),
        );
        let (float_step_s, quantized_step_s) =
            alternate(3, &mut || script_step(&float, &pf, &x, &y), &mut || script_step(&quant, &pq, &x, &y))?;
        let (ratio, step_ratio) = (quantized_s / float_s, quantized_step_s / float_step_s);
        let total = report.layers.len() + report.left_in_float.len();
        println!(
            "{threads:>3} TorchScript {name:<16} eval {:>7.1} ms / {:>7.1} ms ({ratio:.2}x)  step {:>7.1} ms / {:>7.1} ms ({step_ratio:.2}x)  {} of {total} layers rewritten",
            float_s * 1e3,
            quantized_s * 1e3,
            float_step_s * 1e3,
            quantized_step_s * 1e3,
            report.layers.len()
        );
        rows.push(json!({"model": name, "batch": 8, "threads": threads, "float_s": float_s, "quantized_s": quantized_s,
            "ratio": ratio, "step_ratio": step_ratio, "float_step_s": float_step_s, "quantized_step_s": quantized_step_s,
            "layers_rewritten": report.layers.len(), "left_in_float": report.left_in_float}));
    }
    Ok(rows)
}

/// A torchvision-style ResNet-18 (basic blocks, 1000 classes) of the crate's own layers.
fn resnet18(root: nn::Path, mode: InferenceMode) -> Result<torchapprox::layers::ApproxSequential> {
    let quant = QuantSpec { mode, ..Default::default() };
    let conv =
        |stride, padding| ApproxConvConfig { stride, padding, bias: false, quant, ..Default::default() };
    fn block<'a>(
        b: SequentialBuilder<'a>,
        conv: &dyn Fn(i64, i64) -> ApproxConvConfig,
        cin: i64,
        cout: i64,
        stride: i64,
    ) -> SequentialBuilder<'a> {
        b.conv2d("conv1", cin, cout, 3, conv(stride, 1))
            .batch_norm2d("bn1", cout)
            .relu()
            .conv2d("conv2", cout, cout, 3, conv(1, 1))
            .batch_norm2d("bn2", cout)
    }
    let mut b = approx_sequential(root)
        .conv2d("conv1", 3, 64, 7, conv(2, 3))
        .batch_norm2d("bn1", 64)
        .relu()
        .max_pool2d(2);
    let mut cin = 64;
    for (stage, cout) in [64, 128, 256, 512].into_iter().enumerate() {
        let stride = if stage > 0 { 2 } else { 1 };
        b = b.seq(&format!("layer{}", stage + 1), |s| {
            let first = if stride == 1 && cin == cout {
                s.residual("0", |body| block(body, &conv, cin, cout, 1))
            } else {
                s.residual_with(
                    "0",
                    |body| block(body, &conv, cin, cout, stride),
                    "downsample",
                    |d| d.conv2d("0", cin, cout, 1, conv(stride, 0)).batch_norm2d("1", cout),
                )
            };
            first.relu().residual("1", |body| block(body, &conv, cout, cout, 1)).relu()
        });
        cin = cout;
    }
    Ok(b.adaptive_avg_pool2d(1).flatten().linear("fc", 512, 1000, Default::default()).build()?)
}

/// Seconds per Adam training step (batch 8, 224x224) of the crate's ResNet-18 in float and
/// quantized (8-bit PACT inputs, MinMax weights), in alternating rounds.
pub fn resnet18_steps(device: Device) -> Result<(f64, f64)> {
    let build = |mode| -> Result<_> {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(device);
        let net = resnet18(vs.root(), mode)?;
        let opt = nn::Adam::default().build(&vs, 1e-4)?;
        Ok((vs, net, opt))
    };
    let (_vf, float_net, mut float_opt) = build(InferenceMode::Baseline)?;
    let (_vq, quant_net, mut quant_opt) = build(InferenceMode::Quantized)?;
    let x = Tensor::f_randn([8, 3, 224, 224], (Kind::Float, device))?;
    let y = Tensor::f_randint(1000, [8], (Kind::Int64, device))?;
    alternate(
        3,
        &mut || {
            let loss = float_net.f_forward_t(&x, true)?.cross_entropy_for_logits(&y);
            float_opt.backward_step(&loss);
            Ok(())
        },
        &mut || {
            let loss = quant_net.f_forward_t(&x, true)?.cross_entropy_for_logits(&y);
            quant_opt.backward_step(&loss);
            Ok(())
        },
    )
}

/// `distributed[]` rows: the trainer (LeNet, 2 epochs of the embedded digits, 1 thread per
/// process) as 1 process and as 2 on 127.0.0.1, 2 with gradient sums after the backward pass
/// and during it (c10d's Reducer, `overlap`): samples per second (epochs with their
/// evaluation) and the share of that time spent in sums after the pass (those during the
/// pass hide in it).
pub fn distributed_rows() -> Result<Vec<Value>> {
    let train = std::env::current_exe()?.with_file_name("train");
    anyhow::ensure!(train.exists(), "{} is missing (cargo build --release --example train)", train.display());
    let args = ["--model", "lenet", "--epochs", "2", "--threads", "1", "--json"];
    let mut rows = Vec::new();
    for (processes, overlap) in [(1i64, false), (2, false), (2, true)] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let children: Vec<std::process::Child> = (0..processes)
            .map(|rank| {
                let mut c = std::process::Command::new(&train);
                c.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null());
                if !overlap {
                    c.arg("--no-overlap");
                }
                if processes > 1 {
                    c.env("RANK", rank.to_string())
                        .env("WORLD_SIZE", processes.to_string())
                        .env("MASTER_ADDR", "127.0.0.1")
                        .env("MASTER_PORT", port.to_string());
                }
                c.spawn()
            })
            .collect::<std::io::Result<_>>()?;
        let outputs: Vec<std::process::Output> =
            children.into_iter().map(|c| c.wait_with_output()).collect::<std::io::Result<_>>()?;
        let report: Value = serde_json::from_slice(&outputs[0].stdout).context("the trainer's report")?;
        let seconds = report["train_seconds"].as_f64().context("train_seconds")?;
        let summing = report["gradient_sum_seconds"].as_f64().unwrap_or(0.0);
        let samples = 2.0 * report["train_digits"].as_f64().unwrap_or(8000.0);
        let row = json!({"processes": processes, "threads": 1, "samples_per_s": samples / seconds,
            "allreduce_share": summing / seconds, "seconds": seconds, "overlap": overlap});
        let how = match (processes, overlap) {
            (1, _) => "no sums",
            (_, true) => "sums during the pass",
            _ => "sums after the pass",
        };
        println!(
            "  1 LeNet trainer, {processes} process(es) of 1 thread, {how}: {:.0} samples/s, gradient sums after the pass {:.1}% of the time",
            samples / seconds,
            100.0 * summing / seconds
        );
        rows.push(row);
    }
    Ok(rows)
}
