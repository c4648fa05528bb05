//! The settings and the report of the TorchScript rewrite: a layer's quantizers, the model's
//! defaults and overrides, and what was rewritten.

use crate::layers::QuantSpec;

/// Settings of [`ScriptModel::quantize_layers`](crate::torchscript::ScriptModel::quantize_layers).
///
/// Each layer's settings are the crate's own [`QuantSpec`], as for `ApproxLinear` and
/// `ApproxConv2d`: `x_kind`/`w_kind` (PACT or MinMax; LSQ is refused), `bitwidth` or
/// `x_bits`/`w_bits`, `per_channel`, `rounded`, and `init_alpha` (PACT's initial input
/// clipping level, which [`calibrate`](crate::torchscript::ScriptModel::calibrate) replaces).
/// A rewritten layer always runs quantized, so `mode` and `noise_std` do not apply, and its
/// MinMax inputs take each call's range (`x_range` must be [`RangeMode::Batch`](crate::quantizers::RangeMode)).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RewriteConfig {
    /// The spec of every layer without an override (default: 8-bit PACT inputs, MinMax weights).
    pub default: QuantSpec,
    /// Per-layer specs by module path (`layer1.0.conv1`).
    pub overrides: Vec<(String, QuantSpec)>,
}

/// The operation of a rewritten layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOp {
    /// `nn.Linear`.
    Linear,
    /// `nn.Conv2d` with its stride, padding, dilation and groups.
    Conv2d {
        /// Step of the kernel.
        stride: i64,
        /// Zero padding on each side.
        padding: i64,
        /// Spacing of the kernel's taps.
        dilation: i64,
        /// Channel groups.
        groups: i64,
    },
}

/// One layer the rewrite turned into a quantized layer.
#[derive(Debug, Clone, PartialEq)]
pub struct RewrittenLayer {
    /// Module path, e.g. `layer1.0.conv1`.
    pub name: String,
    /// Its TorchScript class (instances of one class share their `forward`).
    pub class: String,
    /// Linear or Conv2d, with the convolution's geometry.
    pub op: LayerOp,
    /// Whether the layer has a bias.
    pub bias: bool,
    /// The quantizers and bits.
    pub spec: QuantSpec,
    /// How many call sites in its parents' code call it (2 or more: called twice in one forward).
    pub calls: usize,
}

/// What [`quantize_layers`](crate::torchscript::ScriptModel::quantize_layers) did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RewriteReport {
    /// The rewritten layers, in module order.
    pub layers: Vec<RewrittenLayer>,
    /// What stays in float, each with the reason (`conv0: Conv1d is not covered`, ...).
    pub left_in_float: Vec<String>,
}
