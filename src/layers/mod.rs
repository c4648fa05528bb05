//! Quantized layers mirroring TorchApprox's `ApproxLinear` and `ApproxConv2d`.

mod approx_layer;
mod conv;
mod linear;

pub use approx_layer::*;
pub use conv::*;
pub use linear::*;
