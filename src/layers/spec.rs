//! [`QuantSpec`]: the quantization settings of one layer, with TorchApprox's defaults.

use super::InferenceMode;
use crate::quantizers::{QuantizerKind, RangeMode};

/// The quantization settings of one layer. Defaults as in TorchApprox:
/// PACT for activations, MinMax (per tensor) for weights, 8 bits, baseline mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantSpec {
    /// The activation quantizer (`x_quantizer`); default PACT.
    pub x_kind: QuantizerKind,
    /// The weight quantizer (`w_quantizer`); default MinMax.
    pub w_kind: QuantizerKind,
    /// Bits of both quantizers, `2..=16`, unless `x_bits` / `w_bits` say otherwise; default 8.
    pub bitwidth: u32,
    /// Bits of the activation quantizer, overriding `bitwidth`; default `None`.
    pub x_bits: Option<u32>,
    /// Bits of the weight quantizer, overriding `bitwidth`; default `None`.
    pub w_bits: Option<u32>,
    /// Initial clipping level of a PACT activation quantizer (TorchApprox's 2.2). A PACT
    /// weight quantizer starts at the weight's own range, `max |w|`, instead. Default 2.2.
    pub init_alpha: f64,
    /// Where a MinMax activation quantizer takes its range: each call's (TorchApprox's) or
    /// a running one, frozen in evaluation so that results do not depend on the batch.
    /// Default [`RangeMode::Batch`], as TorchApprox; the `train` example defaults to
    /// `RangeMode::Running { momentum: 0.9 }` (`--x-range running`), which most networks want.
    pub x_range: RangeMode,
    /// One weight scale per output channel (MinMax weights only); default `false`.
    pub per_channel: bool,
    /// The initial inference mode; default [`InferenceMode::Baseline`].
    pub mode: InferenceMode,
    /// Relative noise level of [`InferenceMode::Noise`]: the noise's standard deviation is
    /// `noise_std * std(y)`; default 0.1.
    pub noise_std: f64,
    /// Round to integers (the default); `false` gives the smooth quantizer used
    /// to check straight-through gradients by finite differences. Default `true`.
    pub rounded: bool,
}

impl QuantSpec {
    /// Bits of the activation quantizer: `x_bits`, else `bitwidth`.
    pub fn x_bitwidth(&self) -> u32 {
        self.x_bits.unwrap_or(self.bitwidth)
    }

    /// Bits of the weight quantizer: `w_bits`, else `bitwidth`.
    pub fn w_bitwidth(&self) -> u32 {
        self.w_bits.unwrap_or(self.bitwidth)
    }
}

impl Default for QuantSpec {
    fn default() -> Self {
        Self {
            x_kind: QuantizerKind::Pact,
            w_kind: QuantizerKind::MinMax,
            bitwidth: 8,
            x_bits: None,
            w_bits: None,
            init_alpha: 2.2,
            x_range: RangeMode::Batch,
            per_channel: false,
            mode: InferenceMode::Baseline,
            noise_std: 0.1,
            rounded: true,
        }
    }
}
