//! Quantized layers inside a TorchScript model: each Linear and Conv2d gets a new `forward`, in
//! TorchScript, that quantizes its input and weight as the crate's layers do. The settings and
//! report (`spec`), the plan (`plan`) and the source generator (`source`) each have a file.

mod attention;
mod plan;
mod probe;
mod source;
mod spec;

pub(crate) use plan::{replace_forwards, reset_weight_caches, rewrite};
pub(crate) use source::{observing_quantizers, APPROX_MULTIPLIER, APPROX_TABLE};
pub use spec::{
    ConvPadding, InputPad, LayerOp, PadMode, RewriteConfig, RewriteReport, RewrittenLayer, TracedAttention,
};
