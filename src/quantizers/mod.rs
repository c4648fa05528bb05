//! Quantizers mirroring `torchapprox.quantizers`: MinMax, PACT, and an enum to pick one per layer.

mod approx_quantizer;
mod kernels;
mod minmax;
mod pact;
mod quantizer;

pub use approx_quantizer::*;
pub use minmax::*;
pub use pact::*;
pub use quantizer::*;
