//! Quantizes one tensor with MinMax and with PACT and prints the integers, the scale and the round trip.

mod common;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use tch::{nn, Device, Kind, Tensor};
use torchapprox::quantizers::{ApproxQuantizer, Quantizer, QuantizerKind};

/// Quantize a tensor with each of TorchApprox's quantizers.
#[derive(Parser, Debug)]
struct Args {
    /// Bits of the signed integer range (2..=16).
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Values to quantize; by default eight seeded normal samples times 2.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    values: Option<Vec<f32>>,
    /// libtorch's intra-op threads (0: libtorch's default).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    threads: i64,
}

fn main() -> ExitCode {
    common::main(|| run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    common::set_threads(args.threads)?;
    let x = match &args.values {
        Some(v) => Tensor::from_slice(v),
        None => {
            tch::manual_seed(0);
            Tensor::randn([8], (Kind::Float, Device::Cpu)) * 2.0
        }
    };
    let vs = nn::VarStore::new(Device::Cpu);
    println!("x                 {}", fmt(&x)?);
    for kind in [QuantizerKind::MinMax, QuantizerKind::Pact] {
        let q = Quantizer::f_new(kind, vs.root() / kind.to_string(), args.bits)?;
        let ints = q.f_quantize(&x)?;
        let back = q.f_fake_quantize(&x)?;
        println!("{kind:<7} integers   {}", fmt(&ints)?);
        println!("{kind:<7} dequant.   {}", fmt(&back)?);
        let alpha = q.alpha().map(|a| format!(", alpha {:.4}", a.double_value(&[0]))).unwrap_or_default();
        println!("{kind:<7} scale {:.4} (int_max {}{alpha})", q.scale_factor(), q.int_max());
    }
    Ok(())
}

fn fmt(t: &Tensor) -> Result<String> {
    let v = Vec::<f32>::try_from(t.to_kind(Kind::Float))?;
    Ok(v.iter().map(|e| format!("{e:8.4}")).collect::<Vec<_>>().join(" "))
}
