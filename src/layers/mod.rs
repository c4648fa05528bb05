//! Quantized layers mirroring TorchApprox's `ApproxLinear` and `ApproxConv2d`, and a container for networks of them.

mod approx_layer;
mod conv;
mod linear;
mod sequential;

pub use approx_layer::*;
pub use conv::*;
pub use linear::*;
pub use sequential::*;
