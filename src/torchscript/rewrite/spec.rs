//! The settings and the report of the TorchScript rewrite: a layer's quantizers, the model's
//! defaults and overrides, and what was rewritten.

use crate::layers::QuantSpec;

/// Settings of [`ScriptModel::quantize_layers`](crate::torchscript::ScriptModel::quantize_layers).
///
/// Each layer's settings are the crate's own [`QuantSpec`], as for `ApproxLinear` and
/// `ApproxConv2d`: `x_kind`/`w_kind` (PACT or MinMax; LSQ is refused), `bitwidth` or
/// `x_bits`/`w_bits`, `per_channel`, `rounded`, and `init_alpha` (PACT's initial input
/// clipping level, which [`calibrate`](crate::torchscript::ScriptModel::calibrate) replaces).
/// A rewritten layer always runs quantized, so `mode` and `noise_std` do not apply. MinMax
/// inputs take `x_range` as the crate's layers do: each call's range, or a running range kept
/// in the buffer `<layer>.x_quantizer.running_max`, updated in training and frozen in evaluation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RewriteConfig {
    /// The spec of every layer without an override (default: 8-bit PACT inputs, MinMax weights).
    pub default: QuantSpec,
    /// Per-layer specs by module path (`layer1.0.conv1`).
    pub overrides: Vec<(String, QuantSpec)>,
    /// Refuse the model ([`Error::LeftInFloat`](crate::Error::LeftInFloat)) when anything
    /// would stay in float, instead of rewriting the rest and reporting it.
    pub strict: bool,
}

/// How a rewritten convolution pads its input inside the convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvPadding {
    /// Zeros on both sides, per dimension (height, width); `padding='valid'` is `Zeros([0, 0])`.
    Zeros([i64; 2]),
    /// PyTorch's `padding='same'`: the output keeps the input's size (stride 1).
    Same,
}

/// A padding mode of `F.pad`, as `nn.Conv2d`'s `padding_mode` applies it before the convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadMode {
    /// Zeros (`'constant'` with no value).
    Constant,
    /// Mirror without repeating the edge (`'reflect'`).
    Reflect,
    /// Repeat the edge (`'replicate'`).
    Replicate,
    /// Wrap around (`'circular'`).
    Circular,
}

impl PadMode {
    /// PyTorch's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            PadMode::Constant => "constant",
            PadMode::Reflect => "reflect",
            PadMode::Replicate => "replicate",
            PadMode::Circular => "circular",
        }
    }

    /// The mode PyTorch calls `name`, if `F.pad` has it.
    pub fn from_name(name: &str) -> Option<Self> {
        [PadMode::Constant, PadMode::Reflect, PadMode::Replicate, PadMode::Circular]
            .into_iter()
            .find(|m| m.name() == name)
    }
}

/// An explicit pad of a convolution's input, before it is quantized (padding copies values,
/// so padding and quantizing commute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputPad {
    /// The mode.
    pub mode: PadMode,
    /// `[left, right, top, bottom]`, as `F.pad` takes them.
    pub sides: [i64; 4],
}

/// The operation of a rewritten layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOp {
    /// `nn.Linear`.
    Linear,
    /// An `nn.MultiheadAttention`: its input projections and `out_proj` are quantized
    /// (quantizers `x_quantizer`, `w_quantizer` and `out_proj.x_quantizer`,
    /// `out_proj.w_quantizer`; with separate projections PACT weights add `k_w_quantizer` and
    /// `v_w_quantizer`), the attention runs in float.
    Attention {
        /// Inputs are `[batch, sequence, features]` (else `[sequence, batch, features]`).
        batch_first: bool,
        /// `None` for a scripted attention, whose forward reads its own settings; for a traced
        /// one, what tracing fixed in its graph.
        traced: Option<TracedAttention>,
        /// Separate `q_proj_weight`, `k_proj_weight` and `v_proj_weight` (key and value of
        /// widths `kdim`, `vdim` other than the embedding's), each quantized on its own; else
        /// one packed `in_proj_weight`.
        separate: bool,
    },
    /// `nn.Conv2d` with its geometry; pairs are (height, width).
    Conv2d {
        /// The kernel's height and width.
        kernel: [i64; 2],
        /// Step of the kernel.
        stride: [i64; 2],
        /// Padding inside the convolution.
        padding: ConvPadding,
        /// Spacing of the kernel's taps.
        dilation: [i64; 2],
        /// Channel groups.
        groups: i64,
        /// A pad applied first (`padding_mode` other than zeros), if any.
        input_pad: Option<InputPad>,
    },
}

/// What tracing fixed in an `nn.MultiheadAttention`'s graph, which keeps neither `num_heads`
/// nor `batch_first`: the rewrite recovers them by running the traced forward on probes and
/// matching PyTorch's computation. Covered: self- and cross-attention (one to three inputs, no
/// masks) without dropout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TracedAttention {
    /// The number of heads.
    pub heads: i64,
    /// Which of the traced forward's inputs are the query, the key and the value: `[0, 0, 0]`
    /// for self-attention, `[0, 1, 1]` for `attn(x, memory, memory)` (tracing passes a tensor
    /// given twice once).
    pub sources: [usize; 3],
    /// `None` when the forward returns the output alone; `Some(average)` when it returns the
    /// attention weights too, averaged over the heads or not.
    pub weights: Option<bool>,
    /// The weights come before the output: a traced module returns its outputs in the order
    /// its caller first used them.
    pub weights_first: bool,
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
///
/// A layer the rewrite cannot turn into a quantized one stays in float, listed in
/// `left_in_float` with its reason; the others are rewritten all the same (unless
/// [`RewriteConfig::strict`] makes that an error).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RewriteReport {
    /// The rewritten layers, in module order.
    pub layers: Vec<RewrittenLayer>,
    /// What stays in float, each with the reason (`conv0: Conv1d is not covered`, ...).
    pub left_in_float: Vec<String>,
}
