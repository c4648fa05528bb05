//! [`InferenceMode`]: how an Approx layer computes its output.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// How an Approx layer computes its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum InferenceMode {
    /// The plain float layer.
    #[default]
    Baseline,
    /// `op(quantize_x(x), quantize_w(w)) / (s_x * s_w) + bias` on integer-valued tensors.
    Quantized,
    /// `Quantized` plus Gaussian noise of standard deviation `noise_std * std(y)`, in training only.
    Noise,
    /// `Quantized` with every 8-bit product read from the layer's [`Multiplier`](crate::approx::Multiplier) table,
    /// summed exactly; gradients are those of the exact products (straight-through), as in
    /// TorchApprox. Needs 8-bit quantizers and a multiplier ([`LayerQuant::set_multiplier`](super::LayerQuant::set_multiplier)).
    Approximate,
}

impl fmt::Display for InferenceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Baseline => "baseline",
            Self::Quantized => "quant",
            Self::Noise => "noise",
            Self::Approximate => "approx",
        })
    }
}

impl FromStr for InferenceMode {
    type Err = Error;

    /// Accepts `baseline`, `quant` (or `quantized`), `noise` and `approx` (or `approximate`).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "baseline" | "float" => Ok(Self::Baseline),
            "quant" | "quantized" => Ok(Self::Quantized),
            "noise" => Ok(Self::Noise),
            "approx" | "approximate" => Ok(Self::Approximate),
            _ => Err(Error::Unknown {
                what: "inference mode",
                name: s.to_string(),
                expected: "`baseline`, `quant`, `noise` or `approx`",
            }),
        }
    }
}

impl InferenceMode {
    pub(super) fn to_u8(self) -> u8 {
        self as u8
    }

    pub(super) fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Quantized,
            2 => Self::Noise,
            3 => Self::Approximate,
            _ => Self::Baseline,
        }
    }
}
