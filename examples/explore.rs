//! Choosing multipliers: each layer's sensitivity to each approximate multiplier, then per-layer
//! assignments that minimise the network's multiplier energy within accuracy-drop budgets,
//! against uniform assignments (one multiplier everywhere).
//!
//! ```sh
//! cargo run --release --example train -- --save q8.safetensors
//! cargo run --release --example explore -- --load q8.safetensors --plot front.png
//! cargo run --release --example explore -- --load q8.safetensors --multipliers mul8s_1KV9,mul8s_1L2N --budgets 0.5 --json
//! ```
//!
//! Energy is each layer's multiplications per input times its multiplier's published power,
//! relative to EvoApprox's exact multiplier (`mul8s_1KV6`) everywhere. The search runs on a
//! held-out slice of the training digits; accuracies are reported on the test digits too.

mod common;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use common::pick_device;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};
use torchapprox::approx::Multiplier;
use torchapprox::checkpoint::load_checked;
use torchapprox::data::{count_correct, normalize, Mnist};
use torchapprox::files::{check_output, write_bytes_atomic};
use torchapprox::layers::{ApproxModule, InferenceMode};
use torchapprox::models::{Architecture, Net};
use torchapprox::quantizers::StateFloors;

/// Search per-layer approximate multipliers against their energy.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// A checkpoint of the trainer (`train --save`), 8-bit.
    #[arg(long)]
    load: PathBuf,
    /// The checkpoint's architecture.
    #[arg(long, default_value = "lenet")]
    model: Architecture,
    /// Candidate multipliers (EvoApprox names); default: every built-in signed one.
    #[arg(long, value_delimiter = ',')]
    multipliers: Vec<String>,
    /// Accuracy-drop budgets in percentage points.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,1,2", allow_hyphen_values = true)]
    budgets: Vec<f64>,
    /// Epochs of approximate-aware retraining of each searched assignment (Adam, lr 1e-4).
    #[arg(long, default_value_t = 0)]
    retrain_epochs: usize,
    /// Held-out training digits the search evaluates on (taken from the end of the training set).
    #[arg(long, default_value_t = 1000, allow_hyphen_values = true)]
    eval_digits: i64,
    /// MNIST-format folder; default: the embedded digits.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Draw relative energy against accuracy (uniform assignments and the searched front) as a PNG.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// libtorch's intra-op threads (0: libtorch's default).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    threads: i64,
}

/// A multiplier with its published power.
struct Candidate {
    multiplier: Multiplier,
    power: f64,
}

/// The network, its data and what each evaluation needs.
struct Bench {
    net: Net,
    layers: Vec<(String, i64)>,
    val: (Tensor, Tensor),
    test: (Tensor, Tensor),
    exact_power: f64,
}

impl Bench {
    /// Gives each layer its multiplier of `assignment` (a candidate index per layer, in the
    /// network's own layer order, which `layers` keeps).
    fn assign(&self, cands: &[Candidate], assignment: &[usize]) -> Result<()> {
        for ((_, l), &c) in self.net.approx_layers().iter().zip(assignment) {
            l.quant().f_set_multiplier(Some(cands[c].multiplier.clone()))?;
        }
        Ok(())
    }

    /// Accuracy (%) of `assignment` on `(x, y)`.
    fn accuracy(&self, cands: &[Candidate], assignment: &[usize], on: &(Tensor, Tensor)) -> Result<f64> {
        self.assign(cands, assignment)?;
        let correct = count_correct(&on.0, &on.1, 500, |x| self.net.f_forward_t(x, false))?;
        Ok(100.0 * correct as f64 / on.1.size()[0] as f64)
    }

    /// Energy of `assignment` relative to the exact multiplier everywhere.
    fn energy(&self, cands: &[Candidate], assignment: &[usize]) -> f64 {
        let total: i64 = self.layers.iter().map(|(_, ops)| ops).sum();
        let used: f64 =
            self.layers.iter().zip(assignment).map(|((_, ops), &c)| *ops as f64 * cands[c].power).sum();
        used / (total as f64 * self.exact_power)
    }
}

/// One evaluated assignment.
#[derive(Clone)]
struct Point {
    budget: Option<f64>,
    assignment: Vec<usize>,
    energy: f64,
    val: f64,
    test: f64,
    note: String,
}

fn point_json(p: &Point, bench: &Bench, cands: &[Candidate]) -> serde_json::Value {
    let assignment: serde_json::Map<String, serde_json::Value> = bench
        .layers
        .iter()
        .zip(&p.assignment)
        .map(|((n, _), &c)| (n.clone(), json!(cands[c].multiplier.name())))
        .collect();
    json!({
        "budget": p.budget, "assignment": assignment, "relative_energy": p.energy,
        "accuracy": p.test / 100.0, "validation_accuracy": p.val / 100.0, "note": p.note,
    })
}

/// The cheapest assignment whose predicted drop (sum of single-layer drops) stays within
/// `allowed`: per layer, moves to cheaper multipliers taken by energy saved per point of drop.
fn greedy(bench: &Bench, cands: &[Candidate], drops: &[Vec<f64>], exact: usize, allowed: f64) -> Vec<usize> {
    let mut assignment = vec![exact; bench.layers.len()];
    let mut spent = 0.0;
    loop {
        let mut best: Option<(f64, usize, usize)> = None;
        for (l, (_, ops)) in bench.layers.iter().enumerate() {
            let now = assignment[l];
            for c in 0..cands.len() {
                let saved = *ops as f64 * (cands[now].power - cands[c].power);
                let extra = drops[l][c].max(0.0) - drops[l][now].max(0.0);
                if saved <= 0.0 || spent + extra > allowed {
                    continue;
                }
                let score = saved / (extra.max(0.0) + 1e-3);
                if best.map_or(true, |(s, _, _)| score > s) {
                    best = Some((score, l, c));
                }
            }
        }
        let Some((_, l, c)) = best else { return assignment };
        spent += drops[l][c].max(0.0) - drops[l][assignment[l]].max(0.0);
        assignment[l] = c;
    }
}

/// `epochs` of approximate-aware training of the network with its multipliers set.
fn retrain(net: &Net, vs: &nn::VarStore, x: &Tensor, y: &Tensor, epochs: usize) -> Result<()> {
    let mut opt = nn::Adam::default().build(vs, 1e-4)?;
    let floors = StateFloors::new(vs.variables());
    let n = y.size()[0];
    for _ in 0..epochs {
        let order = Tensor::randperm(n, (Kind::Int64, x.device()));
        for start in (0..n).step_by(64) {
            let idx = order.narrow(0, start, 64.min(n - start));
            let loss = net
                .f_forward_t(&x.index_select(0, &idx), true)?
                .cross_entropy_for_logits(&y.index_select(0, &idx));
            opt.backward_step(&loss);
            floors.raise()?;
        }
    }
    Ok(())
}

/// A scatter plot of (relative energy from 0, test accuracy over the best five points):
/// uniform assignments in grey, the searched front in blue.
fn plot(path: &PathBuf, uniform: &[Point], searched: &[Point]) -> Result<()> {
    let (w, h, m) = (640u32, 400u32, 30f64);
    let mut px = vec![255u8; (w * h * 3) as usize];
    let all: Vec<&Point> = uniform.iter().chain(searched).collect();
    let (lo_a, hi_a) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.test), b.max(p.test)));
    let hi_e = all.iter().fold(0.0f64, |a, p| a.max(p.energy)).max(1.0);
    // The five points below the best accuracy fill the height; worse ones sit on the axis.
    let (lo_a, hi_a) = (lo_a.max(hi_a - 5.0) - 0.5, hi_a + 0.5);
    let to_xy = |p: &Point| {
        let x = m + (p.energy / hi_e) * (w as f64 - 2.0 * m);
        let y = (h as f64 - m) - (p.test.max(lo_a) - lo_a) / (hi_a - lo_a) * (h as f64 - 2.0 * m);
        (x, y)
    };
    let mut dot = |x: f64, y: f64, r: i64, c: [u8; 3]| {
        for dy in -r..=r {
            for dx in -r..=r {
                let (px_x, px_y) = (x as i64 + dx, y as i64 + dy);
                if px_x >= 0 && px_y >= 0 && px_x < w as i64 && px_y < h as i64 {
                    let at = ((px_y as u32 * w + px_x as u32) * 3) as usize;
                    px[at..at + 3].copy_from_slice(&c);
                }
            }
        }
    };
    // Axes: energy along the bottom (0 to the largest), accuracy up the left.
    for i in 0..(w as i64 - 2 * m as i64) {
        dot(m + i as f64, h as f64 - m, 0, [0, 0, 0]);
    }
    for i in 0..(h as i64 - 2 * m as i64) {
        dot(m, m + i as f64, 0, [0, 0, 0]);
    }
    for p in uniform {
        let (x, y) = to_xy(p);
        dot(x, y, 3, [150, 150, 150]);
    }
    let mut front: Vec<&Point> = searched.iter().collect();
    front.sort_by(|a, b| a.energy.total_cmp(&b.energy));
    for pair in front.windows(2) {
        let ((x0, y0), (x1, y1)) = (to_xy(pair[0]), to_xy(pair[1]));
        for t in 0..=100 {
            let t = t as f64 / 100.0;
            dot(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, 0, [40, 90, 220]);
        }
    }
    for p in &front {
        let (x, y) = to_xy(p);
        dot(x, y, 4, [40, 90, 220]);
    }
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(&px)?;
    write_bytes_atomic(path, &[], &bytes).context("--plot")?;
    Ok(())
}

fn run(args: Args) -> Result<()> {
    common::set_threads(args.threads)?;
    if let Some(p) = &args.plot {
        check_output(p, &[args.load.as_path()]).context("--plot")?;
    }
    if let Some(b) = args.budgets.iter().find(|b| !(b.is_finite() && **b >= 0.0)) {
        bail!("--budgets must be finite and not negative, got {b}");
    }
    ensure!(args.eval_digits >= 10, "--eval-digits must be at least 10, got {}", args.eval_digits);
    let names: Vec<String> = if args.multipliers.is_empty() {
        Multiplier::catalogue().iter().filter(|e| e.signed).map(|e| e.name.clone()).collect()
    } else {
        args.multipliers.clone()
    };
    let exact_name = "mul8s_1KV6";
    let mut cands = Vec::new();
    for n in std::iter::once(exact_name.to_string()).chain(names.into_iter().filter(|n| n != exact_name)) {
        let entry = Multiplier::catalogue().iter().find(|e| e.name == n).with_context(|| {
            format!("--multipliers: {n:?} is not a built-in EvoApprox multiplier (`multiplier --list`)")
        })?;
        cands.push(Candidate { multiplier: Multiplier::evoapprox(&n)?, power: entry.power });
    }
    let device = pick_device("cpu")?;
    let data = match &args.data {
        Some(dir) => Mnist::load_dir(dir)?,
        None => Mnist::embedded()?,
    };
    let n_train = data.train_labels.size()[0];
    ensure!(
        args.eval_digits < n_train,
        "--eval-digits {} leaves no training digits ({n_train})",
        args.eval_digits
    );
    let norm = |x: &Tensor| normalize(x, 0.1307, 0.3081, device);
    let split = n_train - args.eval_digits;
    let val = (
        norm(&data.train_images.narrow(0, split, args.eval_digits))?,
        data.train_labels.narrow(0, split, args.eval_digits),
    );
    let train = (norm(&data.train_images.narrow(0, 0, split))?, data.train_labels.narrow(0, 0, split));
    let test = (norm(&data.test_images)?, data.test_labels.shallow_clone());
    let mut vs = nn::VarStore::new(device);
    let net = args.model.build(&vs.root(), |_| Default::default())?;
    load_checked(&mut vs, &args.load)?;
    // One forward pass fixes each convolution's output size, hence its multiplications.
    let _ = tch::no_grad(|| net.f_forward_t(&val.0.narrow(0, 0, 1), false))?;
    let layers: Vec<(String, i64)> =
        net.approx_layers().iter().map(|(n, l)| (n.clone(), l.opcount())).collect();
    net.f_set_multiplier(Some(cands[0].multiplier.clone()))?;
    net.f_set_mode(InferenceMode::Approximate)?;
    let bench = Bench { net, layers, val, test, exact_power: cands[0].power };
    let say = |line: String| if args.json { eprintln!("{line}") } else { println!("{line}") };
    let exact = vec![0; bench.layers.len()];
    let base = bench.accuracy(&cands, &exact, &bench.val)?;
    say(format!(
        "{} layers, {} candidates; exact multipliers: {base:.2}% on {} held-out digits",
        bench.layers.len(),
        cands.len(),
        args.eval_digits
    ));

    let evaluations = (cands.len() * (bench.layers.len() + 1)) as u64;
    let bar = if !args.json && std::io::stderr().is_terminal() {
        ProgressBar::new(evaluations)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta})")?.progress_chars("=> "),
    );
    bar.set_message("sensitivity");
    // Sensitivity: the drop with one layer approximated, the others exact.
    let mut drops = vec![vec![0.0; cands.len()]; bench.layers.len()];
    for (l, row) in drops.iter_mut().enumerate() {
        for (c, d) in row.iter_mut().enumerate().skip(1) {
            let mut a = exact.clone();
            a[l] = c;
            *d = base - bench.accuracy(&cands, &a, &bench.val)?;
            bar.inc(1);
        }
    }
    bar.set_message("uniform");
    let mut uniform = Vec::new();
    for c in 0..cands.len() {
        let a = vec![c; bench.layers.len()];
        let val = bench.accuracy(&cands, &a, &bench.val)?;
        let test = bench.accuracy(&cands, &a, &bench.test)?;
        uniform.push(Point {
            budget: None,
            energy: bench.energy(&cands, &a),
            assignment: a,
            val,
            test,
            note: String::new(),
        });
        bar.inc(1);
    }
    bar.finish_and_clear();

    let mut searched = Vec::new();
    for &budget in &args.budgets {
        // The additive prediction can be optimistic: where the measured drop exceeds the
        // budget, the layer with the largest predicted drop goes back to exact, until it fits.
        let mut a = greedy(&bench, &cands, &drops, 0, budget);
        let mut val = bench.accuracy(&cands, &a, &bench.val)?;
        while base - val > budget {
            let Some(worst) = (0..a.len())
                .filter(|&l| a[l] != 0)
                .max_by(|&x, &y| drops[x][a[x]].total_cmp(&drops[y][a[y]]))
            else {
                break;
            };
            a[worst] = 0;
            val = bench.accuracy(&cands, &a, &bench.val)?;
        }
        let mut note = String::new();
        // Never worse than the cheapest uniform assignment that meets the budget.
        if let Some(u) =
            uniform.iter().filter(|u| base - u.val <= budget).min_by(|x, y| x.energy.total_cmp(&y.energy))
        {
            if u.energy < bench.energy(&cands, &a) {
                note = format!(
                    "the search found nothing cheaper than uniform {}",
                    cands[u.assignment[0]].multiplier.name()
                );
                (a, val) = (u.assignment.clone(), u.val);
            }
        }
        if args.retrain_epochs > 0 {
            bench.assign(&cands, &a)?;
            retrain(&bench.net, &vs, &train.0, &train.1, args.retrain_epochs)?;
            val = bench.accuracy(&cands, &a, &bench.val)?;
        }
        let test = bench.accuracy(&cands, &a, &bench.test)?;
        let energy = bench.energy(&cands, &a);
        if args.retrain_epochs > 0 {
            // The next budget starts from the checkpoint again, not from this retraining.
            load_checked(&mut vs, &args.load)?;
        }
        searched.push(Point { budget: Some(budget), assignment: a, energy, val, test, note });
    }

    if let Some(p) = &args.plot {
        plot(p, &uniform, &searched)?;
    }
    if args.json {
        println!(
            "{}",
            json!({
                "model": args.model.to_string(), "checkpoint": args.load, "eval_digits": args.eval_digits,
                "base_validation_accuracy": base / 100.0,
                "layers": bench.layers.iter().map(|(n, ops)| json!({"name": n, "multiplications": ops})).collect::<Vec<_>>(),
                "uniform": uniform.iter().map(|p| point_json(p, &bench, &cands)).collect::<Vec<_>>(),
                "searched": searched.iter().map(|p| point_json(p, &bench, &cands)).collect::<Vec<_>>(),
                "plot": args.plot,
            })
        );
        return Ok(());
    }
    println!("{:<22} {:>8} {:>9} {:>9}  assignment", "", "energy", "val %", "test %");
    for p in uniform.iter().chain(&searched) {
        let label = match p.budget {
            Some(b) => format!("searched, budget {b}"),
            None => format!("uniform {}", cands[p.assignment[0]].multiplier.name()),
        };
        let a: Vec<String> = bench
            .layers
            .iter()
            .zip(&p.assignment)
            .map(|((n, _), &c)| format!("{n}={}", cands[c].multiplier.name()))
            .collect();
        println!("{label:<22} {:>8.4} {:>9.2} {:>9.2}  {} {}", p.energy, p.val, p.test, a.join(" "), p.note);
    }
    Ok(())
}

fn main() -> ExitCode {
    common::main(|| run(Args::parse()))
}
