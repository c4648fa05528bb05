//! Quantized layers mirroring TorchApprox's `ApproxLinear` and `ApproxConv2d`, and a container for networks of them.
//!
//! One job per file: `mode` (inference modes), `spec` (a layer's settings), `traits` (the
//! layer and network interfaces), `layer_quant` (the quantizers and the forward pass),
//! `calibration`, `surgery` (replacing a quantizer in a `VarStore`), then the layers
//! (`linear`, `conv`), the container (`sequential`) and its builder (`builder`).
//!
//! The guide below is `docs/networks.md`, kept as this module's documentation so that its
//! examples run as doctests.
#![doc = include_str!("../../docs/networks.md")]

mod builder;
mod calibration;
mod conv;
mod fused;
mod input_alpha;
mod layer_quant;
mod linear;
mod mode;
mod sequential;
mod spec;
mod surgery;
mod traits;

pub use builder::{approx_sequential, SequentialBuilder};
pub use calibration::{pact_alpha, Calibration};
pub use conv::*;
pub(crate) use fused::OpGeom;
pub(crate) use layer_quant::join;
pub use layer_quant::{LayerQuant, QuantizerSlot};
pub use linear::*;
pub use mode::InferenceMode;
pub use sequential::*;
pub use spec::QuantSpec;
pub use traits::{ApproxLayer, ApproxModule};
