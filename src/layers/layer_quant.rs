//! [`LayerQuant`]: a layer's two quantizers, its mode, multiplier and noise level, and the
//! forward pass every Approx layer runs.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use tch::{nn, Tensor};

use super::{Calibration, InferenceMode, OpGeom, QuantSpec};
use crate::approx::Multiplier;
use crate::quantizers::{
    check_defined, grad_enabled, ApproxQuantizer, QuantConfig, Quantizer, QuantizerKind,
};
use crate::{Error, Result};

/// `prefix.name`, or `name` alone under an empty prefix (a VarStore's root).
pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Which of a layer's two quantizers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantizerSlot {
    /// The activation quantizer, `x_quantizer`.
    Input,
    /// The weight quantizer, `w_quantizer`.
    Weight,
}

impl QuantizerSlot {
    /// The quantizer's variable prefix, `x_quantizer` or `w_quantizer`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Input => "x_quantizer",
            Self::Weight => "w_quantizer",
        }
    }
}

/// A layer's two quantizers, its mode and noise level.
#[derive(Debug)]
pub struct LayerQuant {
    pub(super) x_quantizer: Quantizer,
    pub(super) w_quantizer: Quantizer,
    pub(super) mode: AtomicU8,
    pub(super) noise_std: AtomicU64,
    pub(super) multiplier: std::sync::RwLock<Option<Multiplier>>,
    /// Per-batch statistics of the input while calibrating (see [`ApproxModule::calibrate`]).
    pub(super) observed: std::sync::Mutex<Option<(Calibration, Vec<f64>)>>,
    /// Noise mode's error model in integer units of the accumulator, `(mean, std)`, which
    /// replaces the relative noise where set (see [`LayerQuant::set_error_model`]).
    pub(super) error_model: std::sync::RwLock<Option<(f64, f64)>>,
}

impl LayerQuant {
    /// Builds the quantizers of `spec` under `path` (`path / "x_quantizer"`, `path / "w_quantizer"`),
    /// or an error for settings they refuse.
    pub fn f_new(path: &nn::Path, spec: QuantSpec) -> Result<Self> {
        if spec.per_channel && spec.w_kind != QuantizerKind::MinMax {
            return Err(Error::PerChannel(spec.w_kind));
        }
        if !(spec.noise_std.is_finite() && spec.noise_std >= 0.0) {
            return Err(Error::Argument {
                what: "noise_std",
                value: spec.noise_std,
                expected: "finite and >= 0",
            });
        }
        let x_cfg = QuantConfig {
            rounded: spec.rounded,
            init_alpha: spec.init_alpha,
            range: spec.x_range,
            ..QuantConfig::with_bitwidth(spec.x_bitwidth())
        };
        let x_quantizer = Quantizer::from_config(spec.x_kind, path / "x_quantizer", x_cfg)?;
        let w_cfg = QuantConfig {
            per_channel: spec.per_channel,
            rounded: spec.rounded,
            ..QuantConfig::with_bitwidth(spec.w_bitwidth())
        };
        let w_quantizer = Quantizer::from_config(spec.w_kind, path / "w_quantizer", w_cfg)?;
        let q = Self {
            x_quantizer,
            w_quantizer,
            mode: AtomicU8::new(spec.mode.to_u8()),
            noise_std: AtomicU64::new(spec.noise_std.to_bits()),
            multiplier: std::sync::RwLock::new(None),
            observed: std::sync::Mutex::new(None),
            error_model: std::sync::RwLock::new(None),
        };
        if spec.mode == InferenceMode::Approximate {
            q.check_approx_bits()?;
        }
        Ok(q)
    }

    /// Like [`f_new`](Self::f_new), panicking on settings the quantizers refuse.
    pub fn new(path: &nn::Path, spec: QuantSpec) -> Self {
        Self::f_new(path, spec).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a PACT weight quantizer's alpha at the weight's range, `max |w|` (1 for an
    /// all-zero weight), rather than at an activation's 2.2, which can zero every weight;
    /// an LSQ weight quantizer's step size at `2 mean|w| / sqrt(int_max)`.
    pub(crate) fn init_weight_alpha(&self, weight: &Tensor) -> Result<()> {
        if let Quantizer::Lsq(q) = &self.w_quantizer {
            q.init_from(weight)?;
        }
        if let Some(alpha) = self.w_quantizer.alpha() {
            let range = tch::no_grad(|| weight.f_abs()?.f_max()?.f_double_value(&[]))?;
            let init = if range > 0.0 && range.is_finite() { range } else { 1.0 };
            let _ = tch::no_grad(|| alpha.shallow_clone().f_fill_(init))?;
        }
        Ok(())
    }

    /// Quantizes the layer's input; PACT's `alpha` is `x_quantizer.alpha`.
    pub fn x_quantizer(&self) -> &Quantizer {
        &self.x_quantizer
    }

    /// Quantizes the weight; PACT's `alpha` is `w_quantizer.alpha`.
    pub fn w_quantizer(&self) -> &Quantizer {
        &self.w_quantizer
    }

    /// Refuses Approximate mode with quantizers of other than 8 bits (the tables are 8-bit).
    pub(crate) fn check_approx_bits(&self) -> Result<()> {
        let (x, w) = (self.x_quantizer.bitwidth(), self.w_quantizer.bitwidth());
        // Narrower integers index the same 256x256 table (TorchApprox: "unused entries are ignored").
        if x > 8 || w > 8 {
            return Err(Error::ApproxBits { x_bits: x, w_bits: w });
        }
        Ok(())
    }

    /// The current inference mode.
    pub fn mode(&self) -> InferenceMode {
        InferenceMode::from_u8(self.mode.load(Ordering::Relaxed))
    }

    /// Changes the inference mode; takes `&self` so a whole network can switch in place.
    ///
    /// Panics where [`f_set_mode`](Self::f_set_mode) returns an error.
    pub fn set_mode(&self, mode: InferenceMode) {
        self.f_set_mode(mode).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Changes the inference mode, refusing [`InferenceMode::Approximate`] for quantizers
    /// wider than 8 bits (the tables are 8-bit; 2 to 8 bits fit).
    pub fn f_set_mode(&self, mode: InferenceMode) -> Result<()> {
        if mode == InferenceMode::Approximate {
            self.check_approx_bits()?;
        }
        self.mode.store(mode.to_u8(), Ordering::Relaxed);
        Ok(())
    }

    /// Sets (or clears) the multiplier of [`InferenceMode::Approximate`]; panics where
    /// [`f_set_multiplier`](Self::f_set_multiplier) returns an error.
    pub fn set_multiplier(&self, multiplier: Option<Multiplier>) {
        self.f_set_multiplier(multiplier).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sets (or clears) the multiplier of [`InferenceMode::Approximate`], refusing one for
    /// quantizers wider than 8 bits.
    pub fn f_set_multiplier(&self, multiplier: Option<Multiplier>) -> Result<()> {
        if multiplier.is_some() {
            self.check_approx_bits()?;
        }
        *self.multiplier.write().unwrap_or_else(|p| p.into_inner()) = multiplier;
        Ok(())
    }

    /// The multiplier of [`InferenceMode::Approximate`], if set.
    pub fn multiplier(&self) -> Option<Multiplier> {
        self.multiplier.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The relative noise level of [`InferenceMode::Noise`].
    pub fn noise_std(&self) -> f64 {
        f64::from_bits(self.noise_std.load(Ordering::Relaxed))
    }

    /// Changes the relative noise level.
    pub fn set_noise_std(&self, std: f64) {
        self.noise_std.store(std.to_bits(), Ordering::Relaxed);
    }

    /// Sets (or clears) Noise mode's error model: Gaussian noise of `mean` and `std` in
    /// integer units, added to the integer accumulator before it is rescaled, in training and
    /// evaluation alike (it stands for a multiplier's error, as TorchApprox's noise mode does).
    /// Without one, Noise mode adds the relative noise of [`noise_std`](Self::noise_std) in
    /// training only. See [`MultiplierMetrics::layer_error`](crate::approx::MultiplierMetrics::layer_error).
    pub fn set_error_model(&self, model: Option<(f64, f64)>) -> Result<()> {
        if let Some((mean, std)) = model {
            crate::args::check_f32("error model mean", mean)?;
            crate::args::check_f32("error model std", std)?;
            if std < 0.0 {
                return Err(Error::Argument {
                    what: "error model std",
                    value: std,
                    expected: "not negative",
                });
            }
        }
        *self.error_model.write().unwrap_or_else(|p| p.into_inner()) = model;
        Ok(())
    }

    /// Noise mode's error model, `(mean, std)` in integer units, if set.
    pub fn error_model(&self) -> Option<(f64, f64)> {
        *self.error_model.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the layer's float operation `geom` (on input, weight and optional bias) in the
    /// current mode; `lut_op` is the same operation with a multiplier's table products
    /// (Approximate mode). A convolution of one input channel and one group takes a cheaper
    /// route to a first layer's PACT alpha gradient (see `input_alpha`).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
        geom: OpGeom,
        lut_op: impl Fn(&Tensor, &Tensor, &Multiplier) -> Result<Tensor>,
    ) -> Result<Tensor> {
        check_defined(x, "layer input")?;
        self.observe(x)?;
        let mode = self.mode();
        let op = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| geom.forward(x, w, b);
        let channel_shape = geom.channel_shape();
        if mode == InferenceMode::Baseline {
            return op(x, weight, bias);
        }
        if mode == InferenceMode::Quantized {
            if let Some(y) = super::fused::forward(self, x, weight, bias, train, geom)? {
                return Ok(y);
            }
        }
        let qw = self.w_quantizer.f_quantize_scaled(weight)?;
        let (qx, acc) = match &self.x_quantizer {
            // An input without gradient (a first layer's images) whose PACT alpha learns.
            Quantizer::Pact(p) if !x.requires_grad() && p.alpha().requires_grad() && grad_enabled() => {
                let w_max = self.w_quantizer.int_max();
                super::input_alpha::forward(p, x, &qw.values, w_max, geom.one_channel(weight), &op)?
            }
            _ => {
                let qx = self.x_quantizer.f_quantize_scaled_t(x, train)?;
                let acc = op(&qx.values, &qw.values, None)?;
                (qx, acc)
            }
        };
        let acc = if mode == InferenceMode::Approximate {
            let m = self.multiplier().ok_or(Error::NoMultiplier)?;
            self.check_approx_bits()?;
            // The table's sums in value, the exact products' gradient: acc + (lut - acc), detached.
            let lut = lut_op(&qx.values.f_detach()?, &qw.values.f_detach()?, &m)?;
            acc.f_add(&lut.f_sub(&acc.f_detach()?)?)?
        } else {
            acc
        };
        let error_model = if mode == InferenceMode::Noise { self.error_model() } else { None };
        let acc = match error_model {
            // The multiplier's error in integer units, before the scales: mean + std * N(0, 1).
            Some((mean, std)) => acc.f_add(&acc.f_randn_like()?.f_mul_scalar(std)?.f_add_scalar(mean)?)?,
            None => acc,
        };
        // Any per-channel scale (even of one channel) broadcasts as the output's channels, so
        // that the in-place division keeps the output's shape.
        let w_scale = if qw.scale.dim() > 0 { qw.scale.f_reshape(channel_shape)? } else { qw.scale };
        // In place, which autograd allows (every quantizer's scale is a constant, and no op
        // before saves its output): a fresh output-sized tensor costs its page faults, more
        // than the division.
        let mut y = acc;
        let _ = y.f_div_(&qx.scale.f_mul(&w_scale)?)?;
        if mode == InferenceMode::Noise && train && error_model.is_none() {
            let std = self.noise_std();
            if std > 0.0 && y.numel() > 1 {
                let spread = y.f_detach()?.f_std(true)?;
                y = y.f_add(&y.f_randn_like()?.f_mul(&spread)?.f_mul_scalar(std)?)?;
            }
        }
        if let Some(b) = bias {
            let _ = y.f_add_(&b.f_reshape(channel_shape)?)?;
        }
        Ok(y.f_to_kind(x.kind())?)
    }
}

#[cfg(test)]
mod tests {
    use super::join;

    #[test]
    fn names_join_at_dots_and_the_root_has_no_prefix() {
        assert_eq!(join("", "weight"), "weight");
        assert_eq!(join("layer1.0", "conv1"), "layer1.0.conv1");
    }
}
