//! Error metrics of an approximate multiplier over all 65,536 signed 8-bit operand pairs, its
//! error as a 256×256 heatmap, the built-in EvoApprox catalogue, and tables exported as .npy.
//!
//! ```sh
//! cargo run --release --example multiplier -- --multiplier drum:4 --heatmap drum4.png
//! cargo run --release --example multiplier -- --multiplier table.npy --json
//! cargo run --release --example multiplier -- --list --json
//! cargo run --release --example multiplier -- --multiplier mul8s_1KV8 --export mul8s_1KV8.npy
//! ```

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;
use torchapprox::approx::Multiplier;
use torchapprox::files::{check_output, write_bytes_atomic};

/// Print a multiplier's error metrics (EvoApprox's definitions) and draw its error.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// `exact`, `truncated:K`, `mitchell`, `drum:K`, an EvoApprox name (`mul8s_1KV8`, or
    /// `evoapprox:mul8s_1KV8`; see --list), or a table file (`.npy` int32/int64 [256, 256], or
    /// 65,536 little-endian int32); a `:wx` suffix swaps the operands.
    #[arg(long, value_name = "SPEC", required_unless_present = "list")]
    multiplier: Option<String>,
    /// List the built-in EvoApprox multipliers: published power, area, delay and errors next to
    /// the error metrics of their tables (over signed operands, as layers use them).
    #[arg(long, conflicts_with_all = ["heatmap", "export"])]
    list: bool,
    /// Write the table as a 256x256 int32 `.npy` in TorchApprox's layout (row = the first
    /// operand's two's-complement byte), atomically.
    #[arg(long, value_name = "FILE.npy")]
    export: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Draw `approx - exact` for every operand pair (rows: a from -128 to 127, columns: b) as a
    /// PNG, blue below zero, red above, white exact, with the colour scale along the bottom.
    #[arg(long, value_name = "FILE.png")]
    heatmap: Option<PathBuf>,
    /// libtorch's intra-op threads (0: libtorch's default; the metrics run in Rust alone).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    threads: i64,
}

/// A diverging colour for `e` in `[-max, max]`: blue, white, red.
fn colour(e: f64, max: f64) -> [u8; 3] {
    let t = if max > 0.0 { (e / max).clamp(-1.0, 1.0) } else { 0.0 };
    let fade = |v: f64| (255.0 * (1.0 - v.abs())).round() as u8;
    if t < 0.0 {
        [fade(t), fade(t), 255]
    } else {
        [255, fade(t), fade(t)]
    }
}

fn heatmap(m: &Multiplier, path: &Path, input: &Path) -> Result<f64> {
    let max = m.metrics().worst_case_error as f64;
    // 256 rows of products, a gap, and a 16-row scale from -max (left) to +max (right).
    let (w, h) = (256u32, 256u32 + 4 + 16);
    let mut pixels = vec![255u8; (w * h * 3) as usize];
    for a in -128..=127i32 {
        for b in -128..=127i32 {
            let e = (m.product(a, b) as i64 - (a * b) as i64) as f64;
            let at = (((a + 128) as u32 * w + (b + 128) as u32) * 3) as usize;
            pixels[at..at + 3].copy_from_slice(&colour(e, max));
        }
    }
    for y in 260..h {
        for x in 0..w {
            let e = (x as f64 / (w - 1) as f64 * 2.0 - 1.0) * max;
            let at = ((y * w + x) * 3) as usize;
            pixels[at..at + 3].copy_from_slice(&colour(e, max));
        }
    }
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(&pixels)?;
    // Through the crate's one atomic writer: never over a special file or the table it drew.
    write_bytes_atomic(path, &[input], &bytes).context("--heatmap")?;
    Ok(max)
}

/// `--list`: the catalogue, as a table or one JSON list.
fn list(json: bool) -> Result<()> {
    let rows: Vec<(&torchapprox::approx::CatalogueEntry, torchapprox::approx::MultiplierMetrics)> =
        Multiplier::catalogue()
            .iter()
            .map(|e| Ok((e, Multiplier::evoapprox(&e.name)?.metrics())))
            .collect::<Result<_>>()?;
    if json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|(e, m)| {
                json!({
                    "name": e.name, "signed": e.signed, "power": e.power, "area": e.area, "delay": e.delay,
                    "mae": e.mae_percent, "wce": e.wce_percent, "mre": e.mre_percent, "error_rate": e.ep_percent,
                    "table": {"error_rate": m.error_rate, "mean_absolute_error": m.mean_absolute_error,
                        "mred": m.mred, "worst_case_error": m.worst_case_error, "mean_error": m.mean_error,
                        "error_std": m.error_std},
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
        return Ok(());
    }
    println!("published (EvoApproxLib, 45 nm): power mW, area um^2, delay ns, MAE/WCE/MRE/EP %; table: over signed operands");
    println!(
        "{:<12} {:>6} {:>7} {:>8} {:>6} {:>8} {:>8} {:>7} {:>6}   {:>8} {:>9} {:>8}",
        "name",
        "signed",
        "power",
        "area",
        "delay",
        "mae%",
        "wce%",
        "mre%",
        "ep%",
        "err.rate",
        "mean|err|",
        "err.std"
    );
    for (e, m) in rows {
        println!(
            "{:<12} {:>6} {:>7.4} {:>8.1} {:>6.2} {:>8.4} {:>8.4} {:>7.2} {:>6.2}   {:>8.4} {:>9.2} {:>8.2}",
            e.name,
            e.signed,
            e.power,
            e.area,
            e.delay,
            e.mae_percent,
            e.wce_percent,
            e.mre_percent,
            e.ep_percent,
            m.error_rate,
            m.mean_absolute_error,
            m.error_std
        );
    }
    Ok(())
}

fn run(args: Args) -> Result<()> {
    common::set_threads(args.threads)?;
    if args.list {
        return list(args.json);
    }
    let spec = args.multiplier.as_deref().unwrap_or_default();
    let input = Path::new(spec);
    for (flag, out) in [("--heatmap", &args.heatmap), ("--export", &args.export)] {
        if let Some(p) = out {
            check_output(p, &[input]).context(flag)?;
        }
    }
    let m: Multiplier = spec.parse()?;
    if let Some(p) = &args.export {
        write_bytes_atomic(p, &[input], &m.to_npy()).context("--export")?;
    }
    let e = m.metrics();
    let scale = args.heatmap.as_ref().map(|p| heatmap(&m, p, input)).transpose()?;
    if args.json {
        println!(
            "{}",
            json!({
                "multiplier": m.name(), "error_rate": e.error_rate, "mean_absolute_error": e.mean_absolute_error,
                "mred": e.mred, "worst_case_error": e.worst_case_error, "mean_error": e.mean_error,
                "error_std": e.error_std,
                "heatmap": args.heatmap.as_ref().map(|p| p.display().to_string()),
                "export": args.export.as_ref().map(|p| p.display().to_string()),
            })
        );
    } else {
        println!("multiplier           {}", m.name());
        println!("error rate           {:.4}", e.error_rate);
        println!("mean absolute error  {:.3}", e.mean_absolute_error);
        println!("MRED                 {:.5}", e.mred);
        println!("worst-case error     {}", e.worst_case_error);
        println!("mean error (bias)    {:.3}", e.mean_error);
        println!("error std            {:.3}", e.error_std);
        if let Some(p) = &args.export {
            println!("table                {} (256x256 int32 .npy)", p.display());
        }
        if let (Some(p), Some(max)) = (&args.heatmap, scale) {
            println!("heatmap              {} (colour scale -{max} .. +{max})", p.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    common::main(|| run(Args::parse()))
}
