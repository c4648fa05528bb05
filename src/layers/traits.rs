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
    ///
    /// Panics where [`f_set_mode`](Self::f_set_mode) returns an error.
    fn set_mode(&self, mode: InferenceMode) {
        self.f_set_mode(mode).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sets the inference mode of every layer, or none: Approximate mode is refused, naming
    /// the layer, where a layer quantizes wider than 8 bits.
    fn f_set_mode(&self, mode: InferenceMode) -> Result<()> {
        let layers = self.approx_layers();
        if mode == InferenceMode::Approximate {
            check_approx_bits(&layers)?;
        }
        for (_, l) in &layers {
            l.quant().f_set_mode(mode)?;
        }
        Ok(())
    }

    /// Sets (or clears) the multiplier of every layer's Approximate mode; panics where
    /// [`f_set_multiplier`](Self::f_set_multiplier) returns an error.
    fn set_multiplier(&self, multiplier: Option<crate::approx::Multiplier>) {
        self.f_set_multiplier(multiplier).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sets (or clears) the multiplier of every layer, or of none where a layer quantizes
    /// wider than 8 bits (the error names it).
    fn f_set_multiplier(&self, multiplier: Option<crate::approx::Multiplier>) -> Result<()> {
        let layers = self.approx_layers();
        if multiplier.is_some() {
            check_approx_bits(&layers)?;
        }
        for (_, l) in &layers {
            l.quant().f_set_multiplier(multiplier.clone())?;
        }
        Ok(())
    }

    /// Gives every layer Noise mode's error model of `multiplier`: its error's mean and
    /// standard deviation over all operand pairs, scaled by the layer's fan-in
    /// ([`MultiplierMetrics::layer_error`](crate::approx::MultiplierMetrics::layer_error)); `None` clears it.
    fn set_error_model_of(&self, multiplier: Option<&crate::approx::Multiplier>) -> Result<()> {
        let metrics = multiplier.map(|m| m.metrics());
        for (_, l) in self.approx_layers() {
            l.quant().set_error_model(metrics.map(|e| e.layer_error(l.fan_in())))?;
        }
        Ok(())
    }

    /// Sets the noise level of every layer.
    fn set_noise_std(&self, std: f64) {
        for (_, l) in self.approx_layers() {
            l.quant().set_noise_std(std);
        }
    }
}

/// Every layer's operands fit the 8-bit tables, or the first that does not, named.
fn check_approx_bits(layers: &[(String, &dyn ApproxLayer)]) -> Result<()> {
    for (name, l) in layers {
        l.quant()
            .check_approx_bits()
            .map_err(|e| crate::Error::In { name: name.clone(), error: Box::new(e) })?;
    }
    Ok(())
}
