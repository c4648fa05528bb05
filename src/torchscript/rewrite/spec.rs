//! The settings and the report of the TorchScript rewrite: a layer's quantizers, the model's
//! defaults and overrides, and what was rewritten.

use crate::quantizers::QuantizerKind;

/// The quantizers and bitwidths of one rewritten layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerQuantSpec {
    /// Input quantizer: `Pact` (learnable `x_quantizer.alpha`) or `MinMax` (range of each call).
    pub x_kind: QuantizerKind,
    /// Weight quantizer: `MinMax` or `Pact` (`w_quantizer.alpha`, starting at `max |w|`).
    pub w_kind: QuantizerKind,
    /// Bits of the input, `2..=16`.
    pub x_bits: u32,
    /// Bits of the weight, `2..=16`.
    pub w_bits: u32,
    /// One MinMax weight range per output channel.
    pub per_channel: bool,
    /// Round to integers (`true`); `false` keeps the scaled, clipped values, as the
    /// quantizers' `rounded` flag (for gradient checks by finite differences).
    pub rounded: bool,
}

impl Default for LayerQuantSpec {
    /// PACT inputs and MinMax weights, 8 bits each, per tensor: the trainer's defaults.
    fn default() -> Self {
        Self {
            x_kind: QuantizerKind::Pact,
            w_kind: QuantizerKind::MinMax,
            x_bits: 8,
            w_bits: 8,
            per_channel: false,
            rounded: true,
        }
    }
}

/// Settings of [`ScriptModel::quantize_layers`](crate::torchscript::ScriptModel::quantize_layers).
#[derive(Debug, Clone, PartialEq)]
pub struct RewriteConfig {
    /// The spec of every layer without an override.
    pub default: LayerQuantSpec,
    /// Per-layer specs by module path (`layer1.0.conv1`).
    pub overrides: Vec<(String, LayerQuantSpec)>,
    /// PACT's initial input clipping level (TorchApprox's 2.2); [`calibrate`](crate::torchscript::ScriptModel::calibrate) replaces it.
    pub init_alpha: f64,
}

impl Default for RewriteConfig {
    fn default() -> Self {
        Self { default: LayerQuantSpec::default(), overrides: Vec::new(), init_alpha: 2.2 }
    }
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
    pub spec: LayerQuantSpec,
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
