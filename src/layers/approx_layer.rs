//! What the Approx layers share: inference modes, quantizer choice, and the quantized forward pass.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use tch::{nn, Tensor};

use crate::approx::Multiplier;
use crate::quantizers::{
    check_defined, grad_enabled, ApproxQuantizer, QuantConfig, Quantizer, QuantizerKind, RangeMode,
};
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
    /// `Quantized` with every 8-bit product read from the layer's [`Multiplier`] table,
    /// summed exactly; gradients are those of the exact products (straight-through), as in
    /// TorchApprox. Needs 8-bit quantizers and a multiplier ([`LayerQuant::set_multiplier`]).
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
            _ => Err(Error::UnknownMode(s.to_string())),
        }
    }
}

impl InferenceMode {
    fn to_u8(self) -> u8 {
        self as u8
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Quantized,
            2 => Self::Noise,
            3 => Self::Approximate,
            _ => Self::Baseline,
        }
    }
}

/// The quantization settings of one layer. Defaults as in TorchApprox:
/// PACT for activations, MinMax (per tensor) for weights, 8 bits, baseline mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantSpec {
    /// The activation quantizer (`x_quantizer`).
    pub x_kind: QuantizerKind,
    /// The weight quantizer (`w_quantizer`).
    pub w_kind: QuantizerKind,
    /// Bits of both quantizers, `2..=16`, unless `x_bits` / `w_bits` say otherwise.
    pub bitwidth: u32,
    /// Bits of the activation quantizer, overriding `bitwidth`.
    pub x_bits: Option<u32>,
    /// Bits of the weight quantizer, overriding `bitwidth`.
    pub w_bits: Option<u32>,
    /// Initial clipping level of a PACT activation quantizer (TorchApprox's 2.2). A PACT
    /// weight quantizer starts at the weight's own range, `max |w|`, instead.
    pub init_alpha: f64,
    /// Where a MinMax activation quantizer takes its range: each call's (TorchApprox's) or
    /// a running one, frozen in evaluation so that results do not depend on the batch.
    pub x_range: RangeMode,
    /// One weight scale per output channel (MinMax weights only).
    pub per_channel: bool,
    /// The initial inference mode.
    pub mode: InferenceMode,
    /// Relative noise level of [`InferenceMode::Noise`].
    pub noise_std: f64,
    /// Round to integers (the default); `false` gives the smooth quantizer used
    /// to check straight-through gradients by finite differences.
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

/// How [`ApproxModule::calibrate`] turns each layer's inputs into its range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Calibration {
    /// The largest input magnitude seen.
    Max,
    /// The mean over batches of this percentile (`0 < p <= 100`) of the input magnitudes,
    /// which ignores rare outliers.
    Percentile(f64),
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
        if let Calibration::Percentile(p) = method {
            if !(p > 0.0 && p <= 100.0) {
                return Err(Error::Argument {
                    what: "calibration percentile",
                    value: p,
                    expected: "in (0, 100]",
                });
            }
        }
        if batches.is_empty() {
            return Err(Error::Argument { what: "calibration batches", value: 0.0, expected: "at least 1" });
        }
        let layers = self.approx_layers();
        let modes: Vec<InferenceMode> = layers.iter().map(|(_, l)| l.quant().mode()).collect();
        for (_, l) in &layers {
            l.quant().set_mode(InferenceMode::Baseline);
            l.quant().set_observing(Some(method));
        }
        let run = tch::no_grad(|| batches.iter().try_for_each(|b| forward(b).map(drop)));
        let mut ranges = Vec::new();
        for ((name, l), mode) in layers.iter().zip(modes) {
            let stats = l.quant().set_observing(None);
            l.quant().set_mode(mode);
            if run.is_ok() && !stats.is_empty() {
                let range = match method {
                    Calibration::Max => stats.iter().cloned().fold(0.0, f64::max),
                    Calibration::Percentile(_) => stats.iter().sum::<f64>() / stats.len() as f64,
                };
                if range > 0.0 {
                    l.quant().set_input_range(range)?;
                }
                ranges.push((name.clone(), range));
            }
        }
        run?;
        Ok(ranges)
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
    x_quantizer: Quantizer,
    w_quantizer: Quantizer,
    mode: AtomicU8,
    noise_std: AtomicU64,
    multiplier: std::sync::RwLock<Option<Multiplier>>,
    /// Per-batch statistics of the input while calibrating (see [`ApproxModule::calibrate`]).
    observed: std::sync::Mutex<Option<(Calibration, Vec<f64>)>>,
}

impl LayerQuant {
    /// Builds the quantizers of `spec` under `path` (`path / "x_quantizer"`, `path / "w_quantizer"`).
    pub fn new(path: &nn::Path, spec: QuantSpec) -> Result<Self> {
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
        Ok(Self {
            x_quantizer,
            w_quantizer,
            mode: AtomicU8::new(spec.mode.to_u8()),
            noise_std: AtomicU64::new(spec.noise_std.to_bits()),
            multiplier: std::sync::RwLock::new(None),
            observed: std::sync::Mutex::new(None),
        })
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

    /// Replaces a quantizer: removes the old one's variables (`{layer}.x_quantizer.*`)
    /// from `vs` and builds the new one there, so names stay clean (no `alpha__1`).
    /// `layer` is the layer's full path in `vs` (`fc1`, `model.layer1.0.conv1`); `weight`,
    /// the layer's, starts a PACT or LSQ weight quantizer. Optimizers built before still
    /// hold the old variables: build them after.
    ///
    /// ```
    /// use tch::{nn, Device};
    /// use torchapprox::layers::{approx_linear, QuantizerSlot};
    /// use torchapprox::quantizers::{QuantConfig, QuantizerKind};
    ///
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let mut fc = approx_linear(vs.root() / "fc", 4, 2, Default::default());
    /// let lsq = QuantConfig { bitwidth: 4, ..Default::default() };
    /// fc.quant.f_replace_quantizer(&vs, "fc", QuantizerSlot::Input, QuantizerKind::Lsq, lsq, &fc.weight)?;
    /// let mut names: Vec<String> = vs.variables().into_keys().collect();
    /// names.sort();
    /// assert_eq!(names, ["fc.bias", "fc.weight", "fc.x_quantizer.step_size"]);
    /// # Ok::<(), torchapprox::Error>(())
    /// ```
    pub fn f_replace_quantizer(
        &mut self,
        vs: &nn::VarStore,
        layer: &str,
        slot: QuantizerSlot,
        kind: QuantizerKind,
        config: QuantConfig,
        weight: &Tensor,
    ) -> Result<()> {
        let prefix = join(layer, slot.name());
        if prefix.split('.').any(str::is_empty) {
            return Err(Error::Network(format!("layer path {layer:?} has an empty component")));
        }
        // The configuration is checked in a scratch store first, so a bad one changes nothing.
        Quantizer::from_config(kind, nn::VarStore::new(vs.device()).root(), config)?;
        let old = match slot {
            QuantizerSlot::Input => &self.x_quantizer,
            QuantizerSlot::Weight => &self.w_quantizer,
        };
        let group = {
            let mut vars = vs.variables_.lock().unwrap_or_else(|p| p.into_inner());
            // The layer's weight under `layer` proves the store and the name are this layer's;
            // a MinMax quantizer in batch mode has no variable that could.
            let same_layer =
                vars.named_variables.get(&join(layer, "weight")).is_some_and(|w| w.is_set_to(weight));
            let state = old.state_tensors();
            let ours = |t: &Tensor| state.iter().any(|s| t.is_set_to(s));
            let under = format!("{prefix}.");
            let names: Vec<String> =
                vars.named_variables.keys().filter(|n| n.starts_with(&under)).cloned().collect();
            if !same_layer || names.iter().any(|n| !ours(&vars.named_variables[n])) {
                return Err(Error::Network(format!(
                    "{layer:?} in this VarStore is not this layer: give the layer's full path (its weight is `{layer}.weight`) in the store the network was built in"
                )));
            }
            let group = vars.trainable_variables.iter().find(|v| ours(&v.tensor)).map_or(0, |v| v.group);
            for n in &names {
                vars.named_variables.remove(n);
            }
            vars.trainable_variables.retain(|v| !ours(&v.tensor));
            group
        };
        // The new variables join the old ones' optimizer group.
        let path = prefix.split('.').fold(vs.root().set_group(group), |p, part| p.sub(part));
        let new = Quantizer::from_config(kind, &path, config)?;
        match slot {
            QuantizerSlot::Input => self.x_quantizer = new,
            QuantizerSlot::Weight => {
                self.w_quantizer = new;
                self.init_weight_alpha(weight)?;
            }
        }
        Ok(())
    }

    /// Records the input's statistic while calibrating: `max |x|` or its percentile, over
    /// the finite elements.
    fn observe(&self, x: &Tensor) -> Result<()> {
        let mut guard = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        let Some((method, stats)) = guard.as_mut() else { return Ok(()) };
        let _no_grad = tch::no_grad_guard();
        let a = x.f_detach()?.f_abs()?.f_flatten(0, -1)?;
        let a = a.f_masked_select(&a.f_isfinite()?)?;
        if a.numel() == 0 {
            return Ok(());
        }
        let v = match *method {
            Calibration::Max => a.f_max()?.f_double_value(&[])?,
            Calibration::Percentile(p) => {
                let k = ((p / 100.0) * a.numel() as f64).ceil().clamp(1.0, a.numel() as f64) as i64;
                a.f_kthvalue(k, 0, false)?.0.f_double_value(&[])?
            }
        };
        stats.push(v);
        Ok(())
    }

    /// Starts recording input statistics (`Some`) or stops and returns them (`None`).
    fn set_observing(&self, method: Option<Calibration>) -> Vec<f64> {
        let mut guard = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        let old = guard.take().map(|(_, v)| v).unwrap_or_default();
        *guard = method.map(|m| (m, Vec::new()));
        old
    }

    /// Sets the activation quantizer's range from a calibrated input magnitude: PACT's
    /// alpha, MinMax's running range, LSQ's step size (`range / int_max`).
    pub fn set_input_range(&self, range: f64) -> Result<()> {
        crate::args::check_positive("calibrated range", range)?;
        let _guard = tch::no_grad_guard();
        match &self.x_quantizer {
            Quantizer::Pact(p) => {
                let _ = p.alpha().shallow_clone().f_fill_(range)?;
            }
            Quantizer::MinMax(m) => m.set_running_range(range)?,
            Quantizer::Lsq(q) => {
                let _ = q.step_size().shallow_clone().f_fill_(range / self.x_quantizer.int_max() as f64)?;
            }
        }
        Ok(())
    }

    /// Refuses Approximate mode with quantizers of other than 8 bits (the tables are 8-bit).
    fn check_approx_bits(&self) -> Result<()> {
        let (x, w) = (self.x_quantizer.bitwidth(), self.w_quantizer.bitwidth());
        if (x, w) != (8, 8) {
            return Err(Error::Multiplier(format!(
                "approximate mode multiplies 8-bit integers: the layer quantizes inputs to {x} and weights to {w} bits"
            )));
        }
        Ok(())
    }

    /// The current inference mode.
    pub fn mode(&self) -> InferenceMode {
        InferenceMode::from_u8(self.mode.load(Ordering::Relaxed))
    }

    /// Changes the inference mode; takes `&self` so a whole network can switch in place.
    pub fn set_mode(&self, mode: InferenceMode) {
        self.mode.store(mode.to_u8(), Ordering::Relaxed);
    }

    /// Sets (or clears) the multiplier of [`InferenceMode::Approximate`].
    pub fn set_multiplier(&self, multiplier: Option<Multiplier>) {
        *self.multiplier.write().unwrap_or_else(|p| p.into_inner()) = multiplier;
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

    /// Runs `op` (the layer's float operation on input, weight and optional bias) in the current mode;
    /// `lut_op` is the same operation with a multiplier's table products (Approximate mode).
    ///
    /// `channel_shape` is how a per-channel weight scale broadcasts over `op`'s output.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
        channel_shape: &[i64],
        op: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
        lut_op: impl Fn(&Tensor, &Tensor, &Multiplier) -> Result<Tensor>,
    ) -> Result<Tensor> {
        check_defined(x, "layer input")?;
        self.observe(x)?;
        let mode = self.mode();
        if mode == InferenceMode::Baseline {
            return op(x, weight, bias);
        }
        let qw = self.w_quantizer.f_quantize_scaled(weight)?;
        let (qx, acc) = match &self.x_quantizer {
            // An input without gradient (a first layer's images) whose PACT alpha learns:
            // alpha's gradient <g, op(dq_x/dalpha, q_w)> comes from one extra forward op,
            // instead of differentiating op with respect to its input (for a convolution
            // with one input channel, oneDNN's backward-data costs several forward passes).
            Quantizer::Pact(p) if !x.requires_grad() && p.alpha().requires_grad() && grad_enabled() => {
                let qx = tch::no_grad(|| p.f_quantize_scaled(x))?;
                let acc = op(&qx.values, &qw.values, None)?;
                let tangent = op(&p.f_alpha_tangent(x)?, &qw.values.f_detach()?, None)?;
                let alpha = p.alpha().f_reshape([])?;
                // Exactly zero in value (a non-finite alpha gets none), d/dalpha = tangent.
                let delta =
                    alpha.f_sub(&alpha.f_detach()?)?.f_where_scalarother(&alpha.f_isfinite()?, 0.0)?;
                (qx, acc.f_add(&tangent.f_mul(&delta)?)?)
            }
            _ => {
                let qx = self.x_quantizer.f_quantize_scaled_t(x, train)?;
                let acc = op(&qx.values, &qw.values, None)?;
                (qx, acc)
            }
        };
        let acc = if mode == InferenceMode::Approximate {
            let m = self.multiplier().ok_or_else(|| {
                Error::Multiplier("approximate mode needs a multiplier: call set_multiplier first".into())
            })?;
            self.check_approx_bits()?;
            // The table's sums in value, the exact products' gradient: acc + (lut - acc), detached.
            let lut = lut_op(&qx.values.f_detach()?, &qw.values.f_detach()?, &m)?;
            acc.f_add(&lut.f_sub(&acc.f_detach()?)?)?
        } else {
            acc
        };
        let w_scale = if qw.scale.numel() > 1 { qw.scale.f_reshape(channel_shape)? } else { qw.scale };
        let mut y = acc.f_div(&qx.scale.f_mul(&w_scale)?)?;
        if mode == InferenceMode::Noise && train {
            let std = self.noise_std();
            if std > 0.0 && y.numel() > 1 {
                let spread = y.f_detach()?.f_std(true)?;
                y = y.f_add(&y.f_randn_like()?.f_mul(&spread)?.f_mul_scalar(std)?)?;
            }
        }
        if let Some(b) = bias {
            y = y.f_add(&b.f_reshape(channel_shape)?)?;
        }
        Ok(y.f_to_kind(x.kind())?)
    }
}
