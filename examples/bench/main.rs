//! Speed of the quantizers, the table GEMM and whole quantized networks (LeNet-5, ResNet-18,
//! rewritten torchvision models), as ratios against the memory-copy bound, float and a
//! PyTorch reference measured in the same run (see scripts/bench.sh).

#[path = "../common/mod.rs"]
mod common;
mod networks;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use torchapprox::approx::{lut_conv2d, lut_linear, Multiplier};
use torchapprox::layers::{InferenceMode, QuantSpec};
use torchapprox::models::Architecture;
use torchapprox::quantizers::{ApproxQuantizer, MinMaxQuant, PACTQuant};

/// Benchmark the quantizers (CPU, or CUDA with --device cuda).
#[derive(Parser, Debug)]
struct Args {
    /// Thread counts to measure (libtorch's intra-op threads; our CPU kernels follow them).
    #[arg(long, value_delimiter = ',', default_value = "1,2", allow_hyphen_values = true)]
    threads: Vec<i32>,
    /// Tensor sizes in elements.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,65536,1048576,16777216",
        allow_hyphen_values = true
    )]
    sizes: Vec<i64>,
    /// JSON written by scripts/checks/bench_reference.py in the same run.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Where to write the results as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
    /// `cpu` or `cuda`.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    /// Folder of the torchvision models of the `torchscript[]` rows, written by
    /// `scripts/checks/vision_models.py bench DIR` (scripts/bench.sh does); absent: no such rows.
    #[arg(long)]
    models: Option<PathBuf>,
    /// Skip the whole-network rows (`torchscript[]`, and `networks[]`'s ResNet-18).
    #[arg(long)]
    no_networks: bool,
}

fn median_time(device: Device, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        let t0 = Instant::now();
        f();
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        times.push(t0.elapsed().as_secs_f64());
    }
    networks::median(times)
}

fn iters_for(n: i64) -> usize {
    ((1i64 << 26) / n.max(1) / 4).clamp(10, 2000) as usize
}

/// Median seconds per training step (batch 64) of float and quantized LeNet-5, and the median
/// over rounds of their ratio: each round times 15 steps of each net back to back (first one
/// net, then the other, alternately), so that the machine's drift between rounds cancels in
/// the round's ratio.
fn lenet_steps(device: Device) -> Result<(f64, f64, f64)> {
    let build = |mode| -> Result<_> {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(device);
        let net = Architecture::LeNet5.build(&vs.root(), |_| QuantSpec { mode, ..Default::default() })?;
        let opt = nn::Adam::default().build(&vs, 1e-3)?;
        Ok((vs, net, opt))
    };
    let (_vf, float_net, mut float_opt) = build(InferenceMode::Baseline)?;
    let (_vq, quant_net, mut quant_opt) = build(InferenceMode::Quantized)?;
    let x = Tensor::randn([64, 1, 28, 28], (Kind::Float, device));
    let y = Tensor::randint(10, [64], (Kind::Int64, device));
    let (mut tf, mut tq, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..12 {
        let mut nets = [(&float_net, &mut float_opt), (&quant_net, &mut quant_opt)];
        let mut t = [0.0; 2];
        for k in [round % 2, 1 - round % 2] {
            let (net, opt) = &mut nets[k];
            t[k] = median_time(device, 15, || {
                let loss = net.forward_t(&x, true).cross_entropy_for_logits(&y);
                opt.backward_step(&loss);
            });
        }
        tf.push(t[0]);
        tq.push(t[1]);
        ratios.push(t[1] / t[0]);
    }
    Ok((networks::median(tf), networks::median(tq), networks::median(ratios)))
}

/// The table-GEMM layers of the approximate mode (LeNet-5's at batch 64, ResNet-18's 3x3
/// convolutions, a depthwise 3x3, two Linear layers):
/// (name, convolution?, input shape, weight shape, stride, padding, groups).
type ApproxLayer = (&'static str, bool, [i64; 4], [i64; 4], i64, i64, i64);
const APPROX_LAYERS: [ApproxLayer; 10] = [
    ("lenet.conv1", true, [64, 1, 28, 28], [6, 1, 5, 5], 1, 2, 1),
    ("lenet.conv2", true, [64, 6, 14, 14], [16, 6, 5, 5], 1, 0, 1),
    ("lenet.fc1", false, [64, 400, 0, 0], [120, 400, 0, 0], 1, 0, 1),
    ("lenet.fc2", false, [64, 120, 0, 0], [84, 120, 0, 0], 1, 0, 1),
    ("lenet.fc3", false, [64, 84, 0, 0], [10, 84, 0, 0], 1, 0, 1),
    ("linear.512x512x1024", false, [512, 512, 0, 0], [1024, 512, 0, 0], 1, 0, 1),
    ("resnet18.conv64.56x56.b1", true, [1, 64, 56, 56], [64, 64, 3, 3], 1, 1, 1),
    ("resnet18.conv256.14x14.b4", true, [4, 256, 14, 14], [256, 256, 3, 3], 1, 1, 1),
    ("depthwise32.112x112.b1", true, [1, 32, 112, 112], [32, 1, 3, 3], 1, 1, 32),
    ("linear.512x1000.b16", false, [16, 512, 0, 0], [1000, 512, 0, 0], 1, 0, 1),
];

/// Seconds per call and table lookups per call of each approximate layer (drum:4 table).
fn approx_cases(device: Device) -> Result<Vec<(&'static str, f64, i64)>> {
    let m: Multiplier = "drum:4".parse()?;
    let mut out = Vec::new();
    for (name, conv, xs, ws, stride, padding, groups) in APPROX_LAYERS {
        let (xs, ws) = if conv { (&xs[..], &ws[..]) } else { (&xs[..2], &ws[..2]) };
        tch::manual_seed(0);
        let x = Tensor::randint_low(-127, 128, xs, (Kind::Float, device));
        let w = Tensor::randint_low(-127, 128, ws, (Kind::Float, device));
        let run = || {
            if conv {
                lut_conv2d(&x, &w, &m, stride, padding, 1, groups).unwrap()
            } else {
                lut_linear(&x, &w, &m).unwrap()
            }
        };
        let y = run();
        let lookups = y.numel() as i64 * if conv { ws[1] * ws[2] * ws[3] } else { ws[1] };
        let t = median_time(device, if lookups > 100_000_000 { 5 } else { 20 }, || {
            let _ = run();
        });
        out.push((name, t, lookups));
    }
    Ok(out)
}

fn reference_case<'a>(reference: &'a Value, threads: i32, n: i64, quantizer: &str) -> Option<&'a Value> {
    reference["cases"]
        .as_array()?
        .iter()
        .find(|c| c["threads"] == threads && c["n"] == n && c["quantizer"] == quantizer)
}

fn main() -> ExitCode {
    common::main(|| run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    // Each count is measured as given, so 0 (libtorch's choice) has no meaning here.
    if let Some(&t) = args.threads.iter().find(|&&t| t < 1 || t as i64 > torchapprox::args::max_threads()) {
        anyhow::bail!(
            "--threads must list counts from 1 to {} (four per core here), got {t}",
            torchapprox::args::max_threads()
        );
    }
    if let Some(&n) = args.sizes.iter().find(|&&n| n < 1) {
        anyhow::bail!("--sizes must list element counts of at least 1, got {n}");
    }
    let device = if args.device == "cuda" {
        if !torchapprox::cuda::f_is_available()? {
            anyhow::bail!("--device cuda: no CUDA device is available (libtorch sees none)");
        }
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let reference: Value = match &args.reference {
        Some(p) => serde_json::from_slice(&std::fs::read(p).with_context(|| format!("{}", p.display()))?)?,
        None => Value::Null,
    };
    let vs = nn::VarStore::new(device);
    let minmax = MinMaxQuant::new(vs.root() / "minmax", 8);
    let pact = PACTQuant::new(vs.root() / "pact", 8);
    let quantizers: [(&str, &dyn ApproxQuantizer); 2] = [("minmax", &minmax), ("pact", &pact)];
    let mut cases = Vec::new();
    let mut lenet = Vec::new();
    let mut approx = Vec::new();
    let mut torchscript = Vec::new();
    let mut networks = Vec::new();
    let mut distributed = Vec::new();
    println!(
        "{:>3} {:>9} {:<7} {:>11} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "thr",
        "elements",
        "quant",
        "fwd µs",
        "fwd+bwd µs",
        "fwd/bound",
        "f+b/bound",
        "fwd/torch",
        "f+b/torch",
        "bound GB/s"
    );
    for &threads in &args.threads {
        tch::set_num_threads(threads);
        for &n in &args.sizes {
            tch::manual_seed(1);
            let x = Tensor::randn([n], (Kind::Float, device)) * 1.5;
            let mut out = x.empty_like();
            let iters = iters_for(n);
            // The memory-copy bound: 8 bytes per element (read x, write out), no allocation.
            // (tch's add_scalar_out reaches a slow composite kernel; copy_ runs as fast as
            // PyTorch's add(out=), which the figures used.)
            let bound = median_time(device, iters, || out.copy_(&x));
            let clone = median_time(device, iters, || {
                let _ = x.copy();
            });
            for (name, q) in quantizers {
                let fwd = median_time(device, iters, || {
                    let _g = tch::no_grad_guard();
                    let _ = q.f_fake_quantize(&x).unwrap();
                });
                let mut reuse = x.empty_like();
                let fwd_out = median_time(device, iters, || {
                    q.f_fake_quantize_out(&x, &mut reuse).unwrap();
                });
                let fb = median_time(device, iters, || {
                    let xl = x.detach().set_requires_grad(true);
                    q.f_fake_quantize(&xl).unwrap().sum(Kind::Float).backward();
                });
                let r = reference_case(&reference, threads, n, name);
                let (tf, tfb) =
                    (r.and_then(|r| r["forward"].as_f64()), r.and_then(|r| r["forward_backward"].as_f64()));
                let ratio = |a: Option<f64>, b: f64| {
                    a.map(|a| format!("{:.2}x", a / b)).unwrap_or_else(|| "-".into())
                };
                println!(
                    "{threads:>3} {n:>9} {name:<7} {:>11.1} {:>11.1} {:>11.1} {:>8.2}x {:>8.2}x {:>8.2}x {:>9} {:>9} {:>9.1}",
                    fwd * 1e6,
                    fwd_out * 1e6,
                    fb * 1e6,
                    bound / fwd,
                    bound / fwd_out,
                    bound / fb,
                    ratio(tf, fwd),
                    ratio(tfb, fb),
                    8.0 * n as f64 / bound / 1e9
                );
                cases.push(json!({
                    "threads": threads, "n": n, "quantizer": name,
                    "forward_s": fwd, "forward_out_s": fwd_out, "forward_out_over_bound": bound / fwd_out, "forward_backward_s": fb, "bound_copy_s": bound, "clone_s": clone,
                    "forward_over_bound": bound / fwd, "forward_backward_over_bound": bound / fb,
                    "torch_forward_s": tf, "torch_forward_backward_s": tfb,
                    "speedup_forward_vs_torch": tf.map(|t| t / fwd), "speedup_forward_backward_vs_torch": tfb.map(|t| t / fb),
                    "torch_fused_fake_quantize_s": reference_case(&reference, threads, n, "torch_fake_quantize").and_then(|r| r["forward"].as_f64()),
                }));
            }
        }
        let (float, quant, ratio) = lenet_steps(device)?;
        let r = reference["lenet"].as_array().and_then(|l| l.iter().find(|e| e["threads"] == threads));
        let (tfl, tq) =
            (r.and_then(|r| r["float_step"].as_f64()), r.and_then(|r| r["quantized_step"].as_f64()));
        println!(
            "{threads:>3} LeNet-5 step, batch 64: float {:.2} ms, quantized {:.2} ms ({:.2}x){}",
            float * 1e3,
            quant * 1e3,
            ratio,
            match (tfl, tq) {
                (Some(a), Some(b)) =>
                    format!("; PyTorch float {:.2} ms, quantized {:.2} ms ({:.2}x)", a * 1e3, b * 1e3, b / a),
                _ => String::new(),
            }
        );
        lenet.push(json!({"threads": threads, "float_step_s": float, "quantized_step_s": quant, "quantized_over_float": ratio,
            "torch_float_step_s": tfl, "torch_quantized_step_s": tq}));
        networks.push(json!({"network": "lenet5", "threads": threads, "batch": 64, "float_step_s": float,
            "quantized_step_s": quant, "quantized_over_float": ratio}));
        if !args.no_networks {
            let (float, quant) = networks::resnet18_steps(device)?;
            println!(
                "{threads:>3} ResNet-18 (approx_sequential) step, batch 8, 224x224: float {:.1} ms, quantized {:.1} ms ({:.2}x)",
                float * 1e3,
                quant * 1e3,
                quant / float
            );
            networks
                .push(json!({"network": "resnet18", "threads": threads, "batch": 8, "float_step_s": float,
                "quantized_step_s": quant, "quantized_over_float": quant / float}));
            if let Some(dir) = &args.models {
                torchscript.extend(networks::torchscript_rows(dir, threads, device)?);
            }
        }
        for (layer, t, lookups) in approx_cases(device)? {
            let torch_s = reference["approx"].as_array().and_then(|l| {
                l.iter()
                    .find(|e| e["threads"] == threads && e["layer"] == layer)
                    .and_then(|e| e["seconds"].as_f64())
            });
            println!(
                "{threads:>3} table GEMM {layer:<20} {:>10.3} ms  {:>6.2}e9 lookups/s{}",
                t * 1e3,
                lookups as f64 / t / 1e9,
                torch_s.map(|s| format!("  vs PyTorch {:.1}x", s / t)).unwrap_or_default()
            );
            approx.push(json!({"threads": threads, "layer": layer, "lookups": lookups, "seconds": t,
                "lookups_per_s": lookups as f64 / t, "torch_s": torch_s, "speedup_vs_torch": torch_s.map(|s| s / t)}));
        }
    }
    if !args.no_networks && device == Device::Cpu {
        distributed = networks::distributed_rows()?;
    }
    let report = json!({"device": format!("{device:?}"), "cases": cases, "lenet": lenet, "approx": approx,
        "networks": networks, "torchscript": torchscript, "distributed": distributed, "reference_torch": reference["torch"]});
    if let Some(out) = &args.out {
        let inputs: Vec<&std::path::Path> = args.reference.iter().map(|p| p.as_path()).collect();
        torchapprox::files::write_bytes_atomic(
            out,
            &inputs,
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
