//! `PACTQuant`: a learnable clipping level `alpha` (PACT, arXiv:1805.06085), symmetric around zero.

use std::borrow::Borrow;

use tch::{nn, Device, Kind, Tensor};

use super::approx_quantizer::{
    check_defined, check_int_max, check_out, compute_kind, copy_fake_quantized, count_nonfinite,
    grad_enabled, scale_for,
};
use super::kernels;
use super::{check_bitwidth, ApproxQuantizer, NonFinite, QuantConfig, Quantized};
use crate::glue;
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
}

impl PACTQuant {
    /// The derivative of the integer output with respect to `alpha` under PACT's
    /// straight-through rule, without gradient: `sign(x) * int_max / alpha` where
    /// `|x| >= alpha`, 0 elsewhere (and at NaN). A layer whose input needs no gradient uses
    /// it to deliver alpha's gradient with one forward op instead of differentiating its
    /// operation with respect to its input.
    pub fn f_alpha_tangent(&self, x: &Tensor) -> Result<Tensor> {
        check_defined(x, "input")?;
        let _guard = tch::no_grad_guard();
        let kind = compute_kind(x)?;
        // One pass with alpha read once, as the quantizing kernel does.
        if let Some((kind, h)) = self.kernel_plan(x) {
            return Ok(kernels::pact_sign(x, kind, h.alpha, h.scale));
        }
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
        self.checked(x)?;
        pact_quant_scaled(x, &self.alpha, self.int_max(), self.rounded, false)
    }

    fn f_fake_quantize(&self, x: &Tensor) -> Result<Tensor> {
        self.checked(x)?;
        let q = pact_quant_scaled(x, &self.alpha, self.int_max(), self.rounded, true)?;
        Ok(q.values.f_to_kind(x.kind())?)
    }

    fn f_fake_quantize_out(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        check_out(x, out)?;
        let _guard = tch::no_grad_guard();
        // An `out` sharing memory with `x` would be written while read: compute aside, then copy.
        let direct = self.rounded && self.nonfinite == NonFinite::Propagate && kernels::writable(out, x);
        match self.kernel_plan(x).filter(|_| direct) {
            Some((kind, h)) => {
                kernels::pact_to(x, kind, out, h.scale, self.int_max(), true);
                Ok(())
            }
            None => copy_fake_quantized(self, x, out),
        }
    }
}

impl PACTQuant {
    /// The dtype and host-read alpha of a fused CPU pass over `x`, where one applies.
    fn kernel_plan(&self, x: &Tensor) -> Option<(Kind, HostAlpha)> {
        kernels::eligible(x).and_then(|kind| Some((kind, host_plan(&self.alpha, kind, self.int_max())?)))
    }

    /// This call's plan for a fused layer node, where the rounded kernels take `x`.
    pub(crate) fn f_fused_plan(&self, x: &Tensor) -> Result<Option<super::FusedQuant>> {
        if !self.fusable(x) {
            return Ok(None);
        }
        self.checked(x)?;
        Ok(self.kernel_plan(x).map(|(_, host)| super::FusedQuant::Pact { int_max: self.int_max(), host }))
    }

    /// Whether a fused plan may apply to `x`, without reading it: rounded, `x` and alpha on the CPU.
    pub(crate) fn fusable(&self, x: &Tensor) -> bool {
        self.rounded && kernels::eligible(x).is_some() && self.alpha.device() == Device::Cpu
    }

    /// The checks every quantizing entry point makes: defined, on alpha's device, and finite
    /// under [`NonFinite::Reject`].
    fn checked(&self, x: &Tensor) -> Result<()> {
        check_defined(x, "input")?;
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
        Ok(())
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

/// `alpha` as stored, the clipping level in use and the scale, rounded as the compute dtype
/// rounds them, read straight from CPU memory; `None` for an alpha elsewhere.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostAlpha {
    raw: f64,
    pub(crate) alpha: f64,
    pub(crate) scale: f64,
}

impl HostAlpha {
    /// Alpha's gradient from its reduction `sum`: none (zero, never NaN) for a non-finite
    /// alpha, which cannot be learned back.
    pub(crate) fn alpha_gradient(self, sum: f64) -> f64 {
        if self.raw.is_finite() {
            sum
        } else {
            0.0
        }
    }
}

fn host_plan(alpha: &Tensor, kind: Kind, int_max: i64) -> Option<HostAlpha> {
    if alpha.device() != Device::Cpu || alpha.numel() != 1 || !alpha.is_contiguous() {
        return None;
    }
    let raw = match alpha.kind() {
        // SAFETY: a contiguous CPU tensor of one element of the matched type.
        Kind::Float => (unsafe { *(alpha.data_ptr() as *const f32) }) as f64,
        Kind::Double => unsafe { *(alpha.data_ptr() as *const f64) },
        _ => return None,
    };
    let raw_k = if kind == Kind::Float { raw as f32 as f64 } else { raw };
    let a = effective_alpha(raw_k);
    let a = if kind == Kind::Float { a as f32 as f64 } else { a };
    Some(HostAlpha { raw: raw_k, alpha: a, scale: scale_for(int_max, a, kind) })
}

/// What PACT's autograd node needs besides its tensors.
#[derive(Debug, Clone, Copy)]
struct PactNode {
    int_max: i64,
    rounded: bool,
    dequantize: bool,
    kind: Kind,
    /// Set where `x` and `alpha` are on the CPU and `x` takes the kernels.
    host: Option<HostAlpha>,
}

/// PACT's integers (or, with `dequantize`, their values over the scale) with the scale tensor
/// (undefined when dequantized); all on `x`'s device, no sync. With a gradient to compute this
/// is one autograd node (see [`PACTQuant`] for its gradients).
pub(crate) fn pact_quant_scaled(
    x: &Tensor,
    alpha: &Tensor,
    int_max: i64,
    rounded: bool,
    dequantize: bool,
) -> Result<Quantized> {
    pact_quant_scaled_into(x, alpha, int_max, rounded, dequantize, None)
}

/// [`pact_quant_scaled`], writing the values into `into` where no node is recorded, the fused
/// kernel runs and `into` fits `x` (a scratch buffer nothing else shares); they then share
/// its memory.
pub(crate) fn pact_quant_scaled_into(
    x: &Tensor,
    alpha: &Tensor,
    int_max: i64,
    rounded: bool,
    dequantize: bool,
    into: Option<&Tensor>,
) -> Result<Quantized> {
    let kind = compute_kind(x)?;
    if alpha.numel() != 1 {
        return Err(Error::Argument {
            what: "alpha's element count",
            value: alpha.numel() as f64,
            expected: "1",
        });
    }
    let host = if rounded && kernels::eligible(x).is_some() { host_plan(alpha, kind, int_max) } else { None };
    let node = PactNode { int_max, rounded, dequantize, kind, host };
    let grad = (x.requires_grad() || alpha.requires_grad()) && grad_enabled();
    if let Some(h) = host {
        let scale =
            if dequantize { Tensor::new() } else { Tensor::f_scalar_tensor(h.scale, (kind, Device::Cpu))? };
        let into = into.filter(|b| kernels::writable(b, x));
        let values = match (grad, into) {
            (true, _) => glue::apply(node, &[x, alpha], pact_forward, pact_backward)?.remove(0),
            (false, Some(b)) => {
                let mut dst = b.shallow_clone();
                kernels::pact_to(x, kind, &mut dst, h.scale, int_max, dequantize);
                dst
            }
            (false, None) => kernels::pact(x, kind, h.scale, int_max, dequantize),
        };
        return Ok(Quantized { values, scale });
    }
    let _guard = tch::no_grad_guard();
    // 0-dim so that a 0-dim input stays 0-dim.
    let alpha_eff = effective_alpha_tensor(&alpha.f_reshape([])?.f_to_kind(kind)?)?;
    // int_max / alpha as one division in the compute dtype, as the original computes it.
    let scale = alpha_eff.f_full_like(int_max as f64)?.f_div(&alpha_eff)?;
    drop(_guard);
    let values = if grad {
        glue::apply(node, &[x, alpha, &alpha_eff, &scale], pact_forward, pact_backward)?.remove(0)
    } else {
        general_values(x, &scale, node)?
    };
    Ok(Quantized { values, scale: if dequantize { Tensor::new() } else { scale } })
}

/// libtorch's PACT: `round(clamp(x * scale, -int_max, int_max))`, over `scale` if dequantized.
fn general_values(x: &Tensor, scale: &Tensor, n: PactNode) -> Result<Tensor> {
    let im = n.int_max as f64;
    let mut v = x.f_detach()?.f_to_kind(n.kind)?.f_mul(scale)?.f_clamp_(-im, im)?;
    if n.rounded {
        v = v.f_round_()?;
    }
    if n.dequantize {
        // Saturated: with alpha near the dtype's largest value the scale is subnormal.
        let top = super::minmax::kind_max(n.kind);
        v = v.f_div_(scale)?.f_clamp_(-top, top)?;
    }
    Ok(v)
}

/// The node's forward: the values, saving `x` and `alpha` (and the clipping level and scale
/// where they live on the device).
fn pact_forward(n: &PactNode, t: &[Tensor]) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let (x, alpha) = (&t[0], &t[1]);
    let values = match n.host {
        Some(h) => kernels::pact(x, n.kind, h.scale, n.int_max, n.dequantize),
        None => general_values(x, &t[3], *n)?,
    };
    let mut saved = vec![x.shallow_clone(), alpha.shallow_clone()];
    if n.host.is_none() {
        saved.extend([t[2].shallow_clone(), t[3].shallow_clone()]);
    }
    Ok((vec![values], saved))
}

/// The node's backward in one pass: `x`'s gradient and `alpha`'s reduction (see [`PACTQuant`]).
fn pact_backward(
    n: &PactNode,
    saved: &[Tensor],
    grads: &[Tensor],
    needs: &[bool],
    _owned: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let (x, alpha, g) = (&saved[0], &saved[1], &grads[0]);
    if let Some(h) = n.host {
        if let Some(gk) = kernels::Grad::of(g, x) {
            let per = if n.dequantize { 1.0 } else { h.scale };
            let (gx, sum) = kernels::pact_backward(x, n.kind, gk, h.alpha, per, needs[0]);
            // A non-finite alpha cannot be learned back: it gets no gradient, never NaN.
            let ga = h.alpha_gradient(sum * per);
            return Ok(vec![gx, needs[1].then(|| alpha.f_full_like(ga)).transpose()?]);
        }
    }
    let (alpha_eff, scale) = match n.host {
        Some(h) => (
            Tensor::f_scalar_tensor(h.alpha, (n.kind, Device::Cpu))?,
            Tensor::f_scalar_tensor(h.scale, (n.kind, Device::Cpu))?,
        ),
        None => (saved[2].shallow_clone(), saved[3].shallow_clone()),
    };
    let xd = x.f_to_kind(n.kind)?;
    let gk = g.f_to_kind(n.kind)?;
    let per = |t: Tensor| -> Result<Tensor> { Ok(if n.dequantize { t } else { t.f_mul(&scale)? }) };
    let gx = if needs[0] {
        let inside = xd.f_abs()?.f_lt_tensor(&alpha_eff)?;
        Some(per(gk.f_where_scalarother(&inside, 0.0)?)?.f_to_kind(x.kind())?)
    } else {
        None
    };
    let ga = if needs[1] {
        // Selects, not products with masks: a NaN input's gradient never reaches alpha.
        let upper = xd.f_ge_tensor(&alpha_eff)?;
        let lower = xd.f_le_tensor(&alpha_eff.f_neg()?)?;
        let sum = gk
            .f_where_scalarother(&upper, 0.0)?
            .f_sum(n.kind)?
            .f_sub(&gk.f_where_scalarother(&lower, 0.0)?.f_sum(n.kind)?)?;
        let raw = alpha.f_reshape([])?;
        let sum = per(sum)?.f_where_scalarother(&raw.f_isfinite()?, 0.0)?;
        Some(sum.f_reshape(alpha.size())?.f_to_kind(alpha.kind())?)
    } else {
        None
    };
    Ok(vec![gx, ga])
}

/// The original's `PACTQuant.Quant` node: `round(clamp(x * int_max / alpha, -int_max, int_max))`.
///
/// `alpha` is a one-element tensor on `x`'s device, positive and finite (anything else is an
/// [`Error::Argument`]; dequantized values saturate at the dtype's largest finite value); gradients reach both `x`
/// and `alpha` as documented on [`PACTQuant`] (scaled by `int_max / alpha`
/// for these integer values).
pub fn f_pact_quant(x: &Tensor, alpha: &Tensor, int_max: i64) -> Result<Tensor> {
    check_defined(x, "input")?;
    check_defined(alpha, "alpha")?;
    check_int_max(int_max)?;
    if x.device() != alpha.device() {
        return Err(Error::Device { input: x.device(), state: alpha.device(), what: "alpha" });
    }
    // Given directly, an alpha that no clipping level can be is refused; PACTQuant's own
    // learned alpha is floored at ALPHA_MIN instead, as an optimizer step may overshoot.
    if alpha.numel() == 1 {
        let a = alpha.f_double_value(&[0])?;
        if !(a.is_finite() && a > 0.0) {
            return Err(Error::Argument { what: "alpha", value: a, expected: "positive and finite" });
        }
    }
    Ok(pact_quant_scaled(x, alpha, int_max, true, false)?.values)
}

/// Like [`f_pact_quant`], panicking on error.
pub fn pact_quant(x: &Tensor, alpha: &Tensor, int_max: i64) -> Tensor {
    f_pact_quant(x, alpha, int_max).unwrap_or_else(|e| panic!("{e}"))
}
