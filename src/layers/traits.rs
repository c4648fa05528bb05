//! The interfaces of Approx layers ([`ApproxLayer`]) and of networks of them ([`ApproxModule`]).

use tch::{nn, Tensor};

use super::{Calibration, InferenceMode, LayerQuant};
use crate::Result;

/// The interface shared by [`ApproxLinear`](super::ApproxLinear) and [`ApproxConv2d`](super::ApproxConv2d).
pub trait ApproxLayer: nn::ModuleT {
    /// The layer's quantizers and mode.
    fn quant(&self) -> &LayerQuant;
    /// The float weight.
    fn weight(&self) -> &Tensor;
    /// The float bias, if any.
    fn bias(&self) -> Option<&Tensor>;
    /// Inputs feeding each output: `in_features`, or `in_channels / groups * kh * kw`.
    fn fan_in(&self) -> i64;
    /// Multiplications per sample in one forward pass (for a convolution, at the
    /// output size of its last forward pass; 0 before any).
    fn opcount(&self) -> i64;
}

/// A network made of Approx layers, so modes can be set for all of them at once.
pub trait ApproxModule {
    /// Every Approx layer with its name (`conv1`, `fc2`, ...).
    fn approx_layers(&self) -> Vec<(String, &dyn ApproxLayer)>;

    /// Sets every layer's activation range from data before training: runs `forward` on
    /// each batch in float (Baseline mode, no gradient), records each layer's input
    /// magnitudes, and sets PACT alphas, MinMax running ranges and LSQ step sizes from them
    /// (see [`Calibration`]). Modes are restored; returns the ranges by layer.
    fn calibrate(
        &self,
        batches: &[Tensor],
        forward: &dyn Fn(&Tensor) -> Result<Tensor>,
        method: Calibration,
    ) -> Result<Vec<(String, f64)>> {
        super::calibration::calibrate(&self.approx_layers(), batches, forward, method)
    }

    /// Sets the inference mode of every layer.
    fn set_mode(&self, mode: InferenceMode) {
        for (_, l) in self.approx_layers() {
            l.quant().set_mode(mode);
        }
    }

    /// Sets (or clears) the multiplier of every layer's Approximate mode.
    fn set_multiplier(&self, multiplier: Option<crate::approx::Multiplier>) {
        for (_, l) in self.approx_layers() {
            l.quant().set_multiplier(multiplier.clone());
        }
    }

    /// Sets the noise level of every layer.
    fn set_noise_std(&self, std: f64) {
        for (_, l) in self.approx_layers() {
            l.quant().set_noise_std(std);
        }
    }
}
