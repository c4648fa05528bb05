//! `MinMaxQuant`: scale from the tensor's own absolute maximum; nothing to learn.

use std::sync::Mutex;

use tch::{nn, Device, Kind, Tensor};

use super::kernels::{self, MinMaxOut};

use super::approx_quantizer::{
    check_defined, check_int_max, check_out, compute_kind, copy_fake_quantized, count_nonfinite,
    grad_enabled, memory_overlaps, scale_for,
};
use super::{check_bitwidth, ApproxQuantizer, NonFinite, QuantConfig, Quantized};
use crate::{Error, Result};

/// The smallest range MinMax divides by: below it the scale would overflow float32.
pub const MIN_RANGE: f64 = 1e-30;

/// Min/Max quantizer: `round(clamp(x, -m, m) * int_max / m)` with `m = max|x|`.
///
/// `m` is taken without gradient over the finite elements of `x`; an input
/// with no non-zero finite element uses `m = 1` and ranges below
/// [`MIN_RANGE`] are raised to it, so the scale is always finite. Each call
/// reads `m` to the host once (the one sync), and the scale of the last call
/// is kept for [`scale_factor`](ApproxQuantizer::scale_factor).
///
/// With [`QuantConfig::per_channel`], tensors of two or more dimensions get
/// one range per index of dim 0 (a weight's output channel) and the scale
/// tensor has shape `[C, 1, ...]`; that path also reads its scales in one sync.
#[derive(Debug)]
pub struct MinMaxQuant {
    bitwidth: u32,
    nonfinite: NonFinite,
    rounded: bool,
    per_channel: bool,
    last_scales: Mutex<Vec<f64>>,
}

impl MinMaxQuant {
    /// A MinMax quantizer with `bitwidth` bits, or an error outside `2..=16`.
    pub fn f_new(bitwidth: u32) -> Result<Self> {
        Self::from_config(QuantConfig::with_bitwidth(bitwidth))
    }

    /// Like [`f_new`](Self::f_new), panicking on a bad bitwidth.
    pub fn new(bitwidth: u32) -> Self {
        Self::f_new(bitwidth).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A MinMax quantizer from a full configuration.
    pub fn from_config(config: QuantConfig) -> Result<Self> {
        Ok(Self {
            bitwidth: check_bitwidth(config.bitwidth)?,
            nonfinite: config.nonfinite,
            rounded: config.rounded,
            per_channel: config.per_channel,
            last_scales: Mutex::new(Vec::new()),
        })
    }

    /// Whether this quantizer keeps one range per output channel.
    pub fn per_channel(&self) -> bool {
        self.per_channel
    }

    /// The scales of the last call: one, or one per channel; empty before any call.
    pub fn scale_factors(&self) -> Vec<f64> {
        self.last_scales.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn store_scales(&self, scales: Vec<f64>) {
        if let Ok(mut s) = self.last_scales.lock() {
            *s = scales;
        }
    }

    /// Per-channel quantization of `xd` (detached, compute dtype, 2+ dims, not empty).
    fn quantize_per_channel(&self, x: &Tensor, xd: &Tensor, kind: Kind) -> Result<Quantized> {
        let dims: Vec<i64> = (1..xd.dim() as i64).collect();
        let finite_mask = xd.f_isfinite()?;
        let m = xd.f_abs()?.f_where_scalarother(&finite_mask, 0.0)?.f_amax(&dims, true)?;
        // Same rules as per tensor: an empty range is the unit range, a tiny one is raised.
        let m = m.f_clamp_min(MIN_RANGE)?.f_where_scalarother(&m.f_ne(0.0)?, 1.0)?;
        let scale = m.f_full_like(self.int_max() as f64)?.f_div(&m)?;
        // One read brings every scale and whether x was finite.
        let all_finite = finite_mask.f_all()?.f_to_kind(kind)?.f_reshape([1])?;
        let host = Vec::<f64>::try_from(
            Tensor::f_cat(&[scale.f_flatten(0, -1)?, all_finite], 0)?.f_to_kind(Kind::Double)?,
        )?;
        let (scales, finite) = (host[..host.len() - 1].to_vec(), host[host.len() - 1] != 0.0);
        if !finite && self.nonfinite == NonFinite::Reject {
            return Err(Error::NonFinite { count: count_nonfinite(xd)?, numel: x.numel() as i64 });
        }
        let mut values = xd.f_clamp_tensor(Some(m.f_neg()?), Some(m.shallow_clone()))?.f_mul_(&scale)?;
        if self.rounded {
            values = values.f_round_()?;
        }
        if x.requires_grad() && grad_enabled() {
            values = values.f_add(&scaled_identity(x, kind, finite)?.f_mul(&scale)?)?;
        }
        self.store_scales(scales);
        Ok(Quantized { values, scale })
    }

    /// The range `m` used for `x`, read from the device in one sync, and whether `x` is all finite.
    fn range_of(x: &Tensor) -> Result<(f64, bool)> {
        if x.numel() == 0 {
            return Ok((1.0, true));
        }
        // One pass, no temporary the size of x: the extremes give max|x|.
        let (lo, hi) = x.f_aminmax(None::<i64>, false)?;
        let ends = Vec::<f64>::try_from(Tensor::f_stack(&[lo, hi], 0)?.f_to_kind(Kind::Double)?)?;
        let mut range = ends[0].abs().max(ends[1].abs());
        let finite = range.is_finite();
        if !finite {
            // Rare path: a NaN or inf must not decide the scale.
            let finite_abs = x.f_abs()?.f_where_scalarother(&x.f_isfinite()?, 0.0)?;
            range = finite_abs.f_max()?.f_double_value(&[])?;
        }
        Ok((effective_range(range), finite))
    }

    /// The fused CPU path of [`ApproxQuantizer::f_fake_quantize`] (`dequantize`) or of
    /// [`ApproxQuantizer::f_quantize_scaled`]; `None` where it does not apply and the
    /// libtorch path runs instead. Same values bit for bit, same gradients.
    /// Dtype, range and scale for the fused CPU kernels, or `None` where they do not apply
    /// (per channel, unrounded, CUDA, strided, half precision, empty or non-finite input).
    fn kernel_plan(&self, x: &Tensor) -> Option<(Kind, f64, f64)> {
        if self.per_channel || !self.rounded {
            return None;
        }
        let kind = kernels::eligible(x)?;
        let (max_abs, finite) = kernels::abs_max(x, kind);
        if !finite {
            return None;
        }
        let range = effective_range(max_abs);
        Some((kind, range, scale_for(self.int_max(), range, kind)))
    }

    /// The fused CPU path of [`ApproxQuantizer::f_fake_quantize`] (`dequantize`) or of
    /// [`ApproxQuantizer::f_quantize_scaled`]; `None` where it does not apply and the
    /// libtorch path runs instead. Same values bit for bit, same gradients.
    fn fused(&self, x: &Tensor, dequantize: bool) -> Result<Option<Quantized>> {
        let Some((kind, range, scale)) = self.kernel_plan(x) else { return Ok(None) };
        let grad = x.requires_grad() && grad_enabled();
        let run = |out| kernels::minmax(x, kind, range, scale, out);
        let values = match (dequantize, grad) {
            (true, false) => run(MinMaxOut::Dequantized),
            (false, false) => run(MinMaxOut::Integers),
            // x + (fq - x) and x*s + (q - x*s) are exact and carry the straight-through gradient.
            (true, true) => x.f_add(&run(MinMaxOut::DeltaToX))?,
            (false, true) => x.f_mul_scalar(scale)?.f_add(&run(MinMaxOut::DeltaToScaledX))?,
        };
        self.store_scales(vec![scale]);
        let scale =
            if dequantize { Tensor::new() } else { Tensor::f_scalar_tensor(scale, (kind, Device::Cpu))? };
        Ok(Some(Quantized { values, scale }))
    }
}

impl ApproxQuantizer for MinMaxQuant {
    fn bitwidth(&self) -> u32 {
        self.bitwidth
    }

    /// The scale of the last call, 0.0 before any; per channel, the smallest (coarsest) one.
    fn scale_factor(&self) -> f64 {
        self.scale_factors().into_iter().reduce(f64::min).unwrap_or(0.0)
    }

    fn f_quantize_scaled(&self, x: &Tensor) -> Result<Quantized> {
        check_defined(x, "input")?;
        if let Some(q) = self.fused(x, false)? {
            return Ok(q);
        }
        let kind = compute_kind(x)?;
        let xd = x.f_detach()?.f_to_kind(kind)?;
        if self.per_channel && xd.dim() >= 2 && xd.numel() > 0 {
            return self.quantize_per_channel(x, &xd, kind);
        }
        let (range, finite) = Self::range_of(&xd)?;
        if !finite && self.nonfinite == NonFinite::Reject {
            return Err(Error::NonFinite { count: count_nonfinite(&xd)?, numel: x.numel() as i64 });
        }
        let im = self.int_max();
        let scale = scale_for(im, range, kind);
        let values = minmax_values(&xd, range, scale, self.rounded)?;
        let values = if x.requires_grad() && grad_enabled() {
            values.f_add(&scaled_identity(x, kind, finite)?.f_mul_scalar(scale)?)?
        } else {
            values
        };
        self.store_scales(vec![scale]);
        let scale = Tensor::f_scalar_tensor(scale, (kind, x.device()))?;
        Ok(Quantized { values, scale })
    }

    fn f_fake_quantize_out(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        check_out(x, out)?;
        let _guard = tch::no_grad_guard();
        // An `out` sharing memory with `x` would be written while read: compute aside, then copy.
        let direct = kernels::fits(out, x) && !memory_overlaps(x, out);
        match direct.then(|| self.kernel_plan(x)).flatten() {
            Some((kind, range, scale)) => {
                kernels::minmax_to(x, kind, out, range, scale, MinMaxOut::Dequantized);
                self.store_scales(vec![scale]);
                Ok(())
            }
            None => copy_fake_quantized(self, x, out),
        }
    }

    fn f_fake_quantize(&self, x: &Tensor) -> Result<Tensor> {
        check_defined(x, "input")?;
        match self.fused(x, true)? {
            Some(q) => Ok(q.values),
            None => Ok(self.f_quantize_scaled(x)?.f_dequantize()?.f_to_kind(x.kind())?),
        }
    }
}

/// An empty range (all zero, empty, or nothing finite) is the unit range; a tiny one is raised to `MIN_RANGE`.
fn effective_range(max_abs: f64) -> f64 {
    if max_abs == 0.0 {
        1.0
    } else {
        max_abs.max(MIN_RANGE)
    }
}

impl nn::Module for MinMaxQuant {
    /// Fake quantization, `quantize(x) / scale`, in `x`'s dtype.
    ///
    /// # Shapes
    /// - `xs`: any shape; the output has the same shape.
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.f_fake_quantize(xs).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// `round(clamp(x, -range, range) * scale)` without gradient, in place after one copy.
fn minmax_values(xd: &Tensor, range: f64, scale: f64, rounded: bool) -> Result<Tensor> {
    let mut v = xd.f_clamp(-range, range)?.f_mul_scalar_(scale)?;
    if rounded {
        v = v.f_round_()?;
    }
    Ok(v)
}

/// An exact zero whose gradient with respect to `x` is the identity: added to
/// the integers times the scale, it gives them the gradient `grad * scale`.
fn scaled_identity(x: &Tensor, kind: Kind, finite: bool) -> Result<Tensor> {
    let xk = x.f_to_kind(kind)?;
    let zero = xk.f_sub(&xk.f_detach()?)?;
    if finite {
        Ok(zero)
    } else {
        // inf - inf is NaN: keep those elements' value (and gradient) out.
        Ok(zero.f_where_scalarother(&xk.f_detach()?.f_isfinite()?, 0.0)?)
    }
}

/// The original's `MinMaxQuant.Quant` node: `round(clamp(x, -minmax, minmax) * int_max / minmax)`.
///
/// The gradient with respect to `x` is `grad * int_max / minmax` everywhere,
/// as in TorchApprox. `minmax` must lie in `[MIN_RANGE, max finite]` of the compute dtype.
pub fn f_minmax_quant(x: &Tensor, minmax: f64, int_max: i64) -> Result<Tensor> {
    check_defined(x, "input")?;
    let kind = compute_kind(x)?;
    check_int_max(int_max)?;
    // Outside this range the scale int_max / minmax (or minmax itself in float32) is not finite.
    let top = if kind == Kind::Double { f64::MAX } else { f32::MAX as f64 };
    if !(minmax.is_finite() && (MIN_RANGE..=top).contains(&minmax)) {
        return Err(Error::Argument {
            what: "minmax",
            value: minmax,
            expected: "between MIN_RANGE (1e-30) and the compute dtype's largest finite value",
        });
    }
    let scale = scale_for(int_max, minmax, kind);
    let xd = x.f_detach()?.f_to_kind(kind)?;
    let values = minmax_values(&xd, minmax, scale, true)?;
    if x.requires_grad() && grad_enabled() {
        let finite = xd.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0;
        Ok(values.f_add(&scaled_identity(x, kind, finite)?.f_mul_scalar(scale)?)?)
    } else {
        Ok(values)
    }
}

/// Like [`f_minmax_quant`], panicking on error.
pub fn minmax_quant(x: &Tensor, minmax: f64, int_max: i64) -> Tensor {
    f_minmax_quant(x, minmax, int_max).unwrap_or_else(|e| panic!("{e}"))
}
