//! Quantizers mirroring `torchapprox.quantizers`: MinMax, PACT, LSQ, and an enum to pick one per layer.
//!
//! ```
//! use tch::{nn, nn::Module, Device, Tensor};
//! use torchapprox::quantizers::{ApproxQuantizer, MinMaxQuant, PACTQuant};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let x = Tensor::from_slice(&[-1.0f32, -0.25, 0.1, 0.5, 3.0]);
//! let minmax = MinMaxQuant::new(vs.root() / "minmax", 8); // no variable: its range is each call's
//! assert_eq!(Vec::<f32>::try_from(minmax.quantize(&x))?, [-42.0, -11.0, 4.0, 21.0, 127.0]);
//! assert_eq!(minmax.scale_factor(), (127.0f32 / 3.0) as f64);
//!
//! let pact = PACTQuant::new(vs.root() / "act", 4); // alpha starts at 2.2
//! let y = pact.forward(&x); // fake-quantized: integers on a grid of 2.2 / 7
//! assert_eq!(y.size(), [5]);
//! # Ok::<(), tch::TchError>(())
//! ```
//!
//! The guide below is `docs/quantizers.md`, kept as this module's documentation so that its
//! examples run as doctests.
#![doc = include_str!("../../docs/quantizers.md")]

mod approx_quantizer;
mod fused;
mod kernels;
mod lsq;
mod minmax;
mod pact;
mod quantizer;
mod state;
mod sync;

pub use approx_quantizer::*;
pub(crate) use fused::FusedQuant;
pub(crate) use kernels::eligible as kernels_eligible;
pub use lsq::*;
pub use minmax::*;
pub use pact::*;
pub use quantizer::*;
pub use state::{check_state, StateFloors};
pub use sync::{set_range_sync, RangeSync};
