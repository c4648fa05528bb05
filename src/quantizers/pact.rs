//! `PACTQuant`: a learnable clipping level `alpha` (PACT, arXiv:1805.06085), symmetric around zero.

use std::borrow::Borrow;

use tch::{nn, Device, Kind, Tensor};

use super::approx_quantizer::{
    check_defined, check_int_max, check_out, compute_kind, copy_fake_quantized, count_nonfinite,
    grad_enabled, memory_overlaps, scale_for,
};
use super::kernels;
use super::{check_bitwidth, ApproxQuantizer, NonFinite, QuantConfig, Quantized};
use crate::{Error, Result};

/// The smallest clipping level PACT uses: an `alpha` at or below it (zero or
/// negative, as an optimizer may leave it, NaN or -inf) acts as `ALPHA_MIN`.
pub const ALPHA_MIN: f64 = 1e-6;

/// The largest clipping level PACT uses (float32's largest finite value): `+inf` acts as it,
/// so that every scale stays finite and non-zero.
pub const ALPHA_MAX: f64 = f32::MAX as f64;

/// The clipping level PACT uses for a stored `alpha`: `alpha` within `[ALPHA_MIN, ALPHA_MAX]`,
/// the nearest bound outside it, `ALPHA_MIN` for NaN.
pub fn effective_alpha(alpha: f64) -> f64 {
    if alpha.is_nan() {
        ALPHA_MIN
    } else {
        alpha.clamp(ALPHA_MIN, ALPHA_MAX)
    }
}

/// [`effective_alpha`] on a tensor, without gradient.
fn effective_alpha_tensor(alpha: &Tensor) -> Result<Tensor> {
    Ok(alpha.f_detach()?.f_nan_to_num(ALPHA_MIN, ALPHA_MAX, ALPHA_MIN)?.f_clamp(ALPHA_MIN, ALPHA_MAX)?)
}

/// PACT quantizer: `round(clamp(x * int_max / alpha, -int_max, int_max))`.
///
/// `alpha` is a variable named `alpha` of shape `[1]` in the VarStore
/// (initially 2.2), so it trains and saves like any weight.
///
/// Unlike TorchApprox, whose `Quant` node returns no gradient for `alpha`,
/// `alpha` learns as in the PACT paper (rounding treated as identity). For the
/// dequantized output `values / scale`:
/// - `d/dx = 1` where `|x| < alpha`, `0` elsewhere;
/// - `d/dalpha = sign(x)` where `|x| >= alpha`, `0` elsewhere (an element exactly at `alpha` is clipped).
///
/// Below [`ALPHA_MIN`] the clipping level is `ALPHA_MIN`, while the gradient
/// still reaches `alpha` unchanged, so an optimizer can pull it back up; see
/// [`effective_alpha`] for the full rule. A non-finite `alpha` gets no gradient.
/// Inputs of ±inf saturate to ±`int_max` and NaN stays NaN on every path.
/// The forward pass makes no host-device sync.
#[derive(Debug)]
pub struct PACTQuant {
    alpha: Tensor,
    bitwidth: u32,
    nonfinite: NonFinite,
    rounded: bool,
}

impl PACTQuant {
    /// A PACT quantizer whose `alpha` lives under `path`, or an error for a bitwidth outside `2..=16`.
    pub fn f_new<'a, P: Borrow<nn::Path<'a>>>(path: P, bitwidth: u32) -> Result<Self> {
        Self::from_config(path, QuantConfig::with_bitwidth(bitwidth))
    }

    /// Like [`f_new`](Self::f_new), panicking on a bad bitwidth.
    pub fn new<'a, P: Borrow<nn::Path<'a>>>(path: P, bitwidth: u32) -> Self {
        Self::f_new(path, bitwidth).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A PACT quantizer from a full configuration.
    pub fn from_config<'a, P: Borrow<nn::Path<'a>>>(path: P, config: QuantConfig) -> Result<Self> {
        let bitwidth = check_bitwidth(config.bitwidth)?;
        if !config.init_alpha.is_finite() {
            return Err(Error::Argument { what: "init_alpha", value: config.init_alpha, expected: "finite" });
        }
        let alpha = path.borrow().f_var("alpha", &[1], nn::Init::Const(config.init_alpha))?;
        Ok(Self { alpha, bitwidth, nonfinite: config.nonfinite, rounded: config.rounded })
    }

    /// The learnable clipping level, shape `[1]`.
    pub fn alpha(&self) -> &Tensor {
        &self.alpha
    }

    /// The clipping level in use, [`effective_alpha`] of `alpha`, read to the host.
    pub fn alpha_value(&self) -> f64 {
        effective_alpha(self.alpha.double_value(&[0]))
    }

    /// The derivative of the integer output with respect to `alpha` under PACT's
    /// straight-through rule, without gradient: `sign(x) * int_max / alpha` where
    /// `|x| >= alpha`, 0 elsewhere (and at NaN). It lets a layer deliver alpha's
    /// gradient without differentiating its operation with respect to its input.
    pub fn f_alpha_tangent(&self, x: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let kind = compute_kind(x)?;
        let alpha = effective_alpha_tensor(&self.alpha.f_reshape([])?.f_to_kind(kind)?)?;
        let scale = alpha.f_full_like(self.int_max() as f64)?.f_div(&alpha)?;
        let xd = x.f_to_kind(kind)?;
        let upper = xd.f_ge_tensor(&alpha)?.f_to_kind(kind)?;
        let lower = xd.f_le_tensor(&alpha.f_neg()?)?.f_to_kind(kind)?;
        Ok(upper.f_sub(&lower)?.f_mul(&scale)?)
    }
}

impl ApproxQuantizer for PACTQuant {
    fn bitwidth(&self) -> u32 {
        self.bitwidth
    }

    /// `int_max / alpha` (one host-device sync).
    fn scale_factor(&self) -> f64 {
        (self.int_max() as f32 / self.alpha_value() as f32) as f64
    }

    fn f_quantize_scaled(&self, x: &Tensor) -> Result<Quantized> {
        check_defined(x, "input")?;
        if let Some(q) = self.fused(x, false)? {
            return Ok(q);
        }
        if x.device() != self.alpha.device() {
            return Err(Error::Device { input: x.device(), state: self.alpha.device(), what: "PACT alpha" });
        }
        if self.nonfinite == NonFinite::Reject {
            compute_kind(x)?;
            let count = count_nonfinite(x)?;
            if count > 0 {
                return Err(Error::NonFinite { count, numel: x.numel() as i64 });
            }
        }
        pact_quant_scaled(x, &self.alpha, self.int_max(), self.rounded)
    }

    fn f_fake_quantize_out(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        check_out(x, out)?;
        let _guard = tch::no_grad_guard();
        // An `out` sharing memory with `x` would be written while read: compute aside, then copy.
        let direct = kernels::fits(out, x) && !memory_overlaps(x, out);
        match direct.then(|| self.kernel_plan(x)).flatten() {
            Some((kind, _, scale)) => {
                kernels::pact_to(x, kind, out, scale, self.int_max(), true);
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

impl PACTQuant {
    /// `alpha` read straight from CPU memory (no libtorch call), where the fused path can use it.
    fn fused_alpha(&self) -> Option<f64> {
        if self.alpha.device() != Device::Cpu || !self.rounded || !self.alpha.is_contiguous() {
            return None;
        }
        match self.alpha.kind() {
            // SAFETY: a contiguous CPU variable of one element of the matched type.
            Kind::Float => Some(unsafe { *(self.alpha.data_ptr() as *const f32) } as f64),
            Kind::Double => Some(unsafe { *(self.alpha.data_ptr() as *const f64) }),
            _ => None,
        }
    }

    /// Dtype, clipping level and scale for the fused CPU kernels, or `None` where they do
    /// not apply (CUDA, strided or half-precision input, `NonFinite::Reject`, unrounded,
    /// or an alpha below `ALPHA_MIN`, whose straight-through bookkeeping the general path does).
    fn kernel_plan(&self, x: &Tensor) -> Option<(Kind, f64, f64)> {
        if self.nonfinite == NonFinite::Reject {
            return None;
        }
        let kind = kernels::eligible(x)?;
        let alpha = self.fused_alpha()?;
        // Round alpha and the scale as the compute dtype does, like the libtorch path.
        let alpha = if kind == Kind::Float { alpha as f32 as f64 } else { alpha };
        if !(ALPHA_MIN..=ALPHA_MAX).contains(&alpha) {
            return None;
        }
        Some((kind, alpha, scale_for(self.int_max(), alpha, kind)))
    }

    /// The fused CPU path (see the `kernels` module); `None` where it does not apply.
    fn fused(&self, x: &Tensor, dequantize: bool) -> Result<Option<Quantized>> {
        let Some((kind, alpha, scale)) = self.kernel_plan(x) else { return Ok(None) };
        let im = self.int_max();
        let grad = (x.requires_grad() || self.alpha.requires_grad()) && grad_enabled();
        let values = if !grad {
            kernels::pact(x, kind, scale, im, dequantize)
        } else {
            let parts = kernels::pact_train(x, kind, scale, im, alpha, !dequantize);
            let Some((e, m, c)) = parts else { return Ok(None) };
            // 0-dim so that a 0-dim input stays 0-dim.
            let a = self.alpha.f_reshape([])?.f_to_kind(kind)?;
            // x*m + alpha*c carries PACT's gradient; every product is exact (m and c are 0 or
            // +-1), so the sums reproduce the output exactly, fused multiply-add or not.
            if dequantize {
                e.f_addcmul(x, &m)?.f_addcmul(&a, &c)?
            } else {
                x.f_mul(&m)?.f_addcmul(&a, &c)?.f_mul_scalar(scale)?.f_add(&e)?
            }
        };
        let scale =
            if dequantize { Tensor::new() } else { Tensor::f_scalar_tensor(scale, (kind, Device::Cpu))? };
        Ok(Some(Quantized { values, scale }))
    }
}

impl nn::Module for PACTQuant {
    /// Fake quantization, `quantize(x) / scale`, in `x`'s dtype.
    ///
    /// # Shapes
    /// - `xs`: any shape; the output has the same shape.
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.f_fake_quantize(xs).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// PACT quantization with its scale tensor; all on `x`'s device, no sync.
fn pact_quant_scaled(x: &Tensor, alpha: &Tensor, int_max: i64, rounded: bool) -> Result<Quantized> {
    let kind = compute_kind(x)?;
    if alpha.numel() != 1 {
        return Err(Error::Argument {
            what: "alpha's element count",
            value: alpha.numel() as f64,
            expected: "1",
        });
    }
    let im = int_max as f64;
    // 0-dim so that a 0-dim input stays 0-dim.
    let alpha_raw = alpha.f_reshape([])?.f_to_kind(kind)?;
    let alpha_eff = effective_alpha_tensor(&alpha_raw)?;
    // int_max / alpha as one division in the compute dtype, as the original computes it.
    let scale = alpha_eff.f_full_like(im)?.f_div(&alpha_eff)?;
    let xd = x.f_detach()?.f_to_kind(kind)?;
    let mut values = xd.f_mul(&scale)?.f_clamp_(-im, im)?;
    if rounded {
        values = values.f_round_()?;
    }
    if (x.requires_grad() || alpha.requires_grad()) && grad_enabled() {
        values =
            values.f_add(&pact_gradient_carrier(x, &xd, &alpha_raw, &alpha_eff, kind)?.f_mul(&scale)?)?;
    }
    Ok(Quantized { values, scale })
}

/// A tensor that is exactly zero but whose gradient is PACT's: `x` inside
/// `(-alpha, alpha)`, `±alpha` where clipped, nothing for NaN elements.
///
/// Built from selections rather than products with masks, so that a NaN in
/// the upstream gradient at a NaN input never reaches `alpha`.
fn pact_gradient_carrier(
    x: &Tensor,
    xd: &Tensor,
    alpha_raw: &Tensor,
    alpha_eff: &Tensor,
    kind: Kind,
) -> Result<Tensor> {
    let inside = xd.f_abs()?.f_lt_tensor(alpha_eff)?;
    let upper = xd.f_ge_tensor(alpha_eff)?;
    let lower = xd.f_le_tensor(&alpha_eff.f_neg()?)?;
    // An infinite alpha would make the surrogate inf - inf: it gets no gradient instead.
    let alpha_raw = &alpha_raw.f_where_scalarother(&alpha_raw.f_isfinite()?, 0.0)?;
    let surrogate = x
        .f_to_kind(kind)?
        .f_where_scalarother(&inside, 0.0)?
        .f_add(&alpha_raw.f_where_scalarother(&upper, 0.0)?)?
        .f_sub(&alpha_raw.f_where_scalarother(&lower, 0.0)?)?;
    Ok(surrogate.f_sub(&surrogate.f_detach()?)?)
}

/// The original's `PACTQuant.Quant` node: `round(clamp(x * int_max / alpha, -int_max, int_max))`.
///
/// `alpha` is a one-element tensor on `x`'s device; gradients reach both `x`
/// and `alpha` as documented on [`PACTQuant`] (scaled by `int_max / alpha`
/// for these integer values).
pub fn f_pact_quant(x: &Tensor, alpha: &Tensor, int_max: i64) -> Result<Tensor> {
    check_defined(x, "input")?;
    check_defined(alpha, "alpha")?;
    check_int_max(int_max)?;
    if x.device() != alpha.device() {
        return Err(Error::Device { input: x.device(), state: alpha.device(), what: "alpha" });
    }
    Ok(pact_quant_scaled(x, alpha, int_max, true)?.values)
}

/// Like [`f_pact_quant`], panicking on error.
pub fn pact_quant(x: &Tensor, alpha: &Tensor, int_max: i64) -> Tensor {
    f_pact_quant(x, alpha, int_max).unwrap_or_else(|e| panic!("{e}"))
}
