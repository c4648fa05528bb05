//! `LSQQuant`: a learned step size (LSQ, Esser et al., arXiv:1902.08153), symmetric around zero.

use std::borrow::Borrow;

use tch::{nn, Kind, Tensor};

use super::approx_quantizer::{check_defined, compute_kind, count_nonfinite, grad_enabled};
use super::{check_bitwidth, ApproxQuantizer, NonFinite, QuantConfig, Quantized};
use crate::glue;
use crate::{Error, Result};

/// The smallest step size LSQ uses; a smaller, zero, negative or NaN `step_size` acts as it.
pub const STEP_MIN: f64 = 1e-12;

/// LSQ quantizer: `round(clamp(x / s, -int_max, int_max))` with a learnable step size `s`.
///
/// `s` is a variable named `step_size` of shape `[1]` in the VarStore. It starts at
/// `init_alpha / int_max`, so that the clipping level is the configured `init_alpha`
/// (weights: `2 mean|w| / sqrt(int_max)` as in the paper, set by the layers). For the
/// dequantized output `q s`, with `v = x / s`:
/// - `d/dx = 1` where `|v| < int_max`, `0` elsewhere;
/// - `d/ds = round(v) - v` where `|v| < int_max`, `sign(v) int_max` elsewhere, times the
///   gradient scale `1 / sqrt(numel(x) int_max)` of the paper.
///
/// Integer outputs get the same gradients times `1 / s` (the scale stays a constant for
/// autograd, as for the other quantizers). NaN inputs give no gradient.
#[derive(Debug)]
pub struct LSQQuant {
    step_size: Tensor,
    bitwidth: u32,
    nonfinite: NonFinite,
    rounded: bool,
}

impl LSQQuant {
    /// An LSQ quantizer of `bitwidth` bits whose `step_size` lives under `path`, or an error
    /// outside `2..=16`.
    pub fn f_new<'a, P: Borrow<nn::Path<'a>>>(path: P, bitwidth: u32) -> Result<Self> {
        Self::from_config(path, QuantConfig::with_bitwidth(bitwidth))
    }

    /// Like [`f_new`](Self::f_new), panicking on a bad bitwidth.
    pub fn new<'a, P: Borrow<nn::Path<'a>>>(path: P, bitwidth: u32) -> Self {
        Self::f_new(path, bitwidth).unwrap_or_else(|e| panic!("{e}"))
    }

    /// An LSQ quantizer whose `step_size` lives under `path`, or an error for a bitwidth outside `2..=16`.
    pub fn from_config<'a, P: Borrow<nn::Path<'a>>>(path: P, config: QuantConfig) -> Result<Self> {
        let bitwidth = check_bitwidth(config.bitwidth)?;
        crate::args::check_positive("init_alpha", config.init_alpha)?;
        let init = config.init_alpha / super::int_max(bitwidth) as f64;
        let step_size = path.borrow().f_var("step_size", &[1], nn::Init::Const(init))?;
        Ok(Self { step_size, bitwidth, nonfinite: config.nonfinite, rounded: config.rounded })
    }

    /// The learnable step size, shape `[1]`.
    pub fn step_size(&self) -> &Tensor {
        &self.step_size
    }

    /// Sets the step size from data as the paper does, `2 mean|x| / sqrt(int_max)` (the
    /// layers do this for their weights).
    pub fn init_from(&self, x: &Tensor) -> Result<()> {
        let mean = tch::no_grad(|| x.f_abs()?.f_mean(Kind::Double)?.f_double_value(&[]))?;
        let s = 2.0 * mean / (self.int_max() as f64).sqrt();
        if s.is_finite() && s > 0.0 {
            let _ = tch::no_grad(|| self.step_size.shallow_clone().f_fill_(s))?;
        }
        Ok(())
    }

    fn run(&self, x: &Tensor, dequantize: bool) -> Result<Quantized> {
        check_defined(x, "input")?;
        let kind = compute_kind(x)?;
        if x.device() != self.step_size.device() {
            return Err(Error::Device {
                input: x.device(),
                state: self.step_size.device(),
                what: "LSQ step_size",
            });
        }
        if self.nonfinite == NonFinite::Reject {
            let count = count_nonfinite(x)?;
            if count > 0 {
                return Err(Error::NonFinite { count, numel: x.numel() as i64 });
            }
        }
        let _guard = tch::no_grad_guard();
        let s = self.step_size.f_reshape([])?.f_to_kind(kind)?.f_nan_to_num(
            STEP_MIN,
            f32::MAX as f64,
            STEP_MIN,
        )?;
        let s = s.f_clamp(STEP_MIN, f32::MAX as f64)?;
        // The scale maps floats to integers: 1 / s, as one division in the compute dtype.
        let scale = s.f_full_like(1.0)?.f_div(&s)?;
        drop(_guard);
        let node = LsqNode {
            int_max: self.int_max(),
            rounded: self.rounded,
            dequantize,
            kind,
            grad_scale: 1.0 / ((x.numel().max(1) as f64) * self.int_max() as f64).sqrt(),
        };
        let grad = (x.requires_grad() || self.step_size.requires_grad()) && grad_enabled();
        let values = if grad {
            glue::apply(node, &[x, &self.step_size, &s, &scale], lsq_forward, lsq_backward)?.remove(0)
        } else {
            let _guard = tch::no_grad_guard();
            lsq_values(x, &s, &node)?
        };
        Ok(Quantized { values, scale: if dequantize { Tensor::new() } else { scale } })
    }
}

impl ApproxQuantizer for LSQQuant {
    fn bitwidth(&self) -> u32 {
        self.bitwidth
    }

    /// `1 / step_size` (one host-device sync).
    fn scale_factor(&self) -> f64 {
        1.0 / self.step_size.double_value(&[0]).max(STEP_MIN)
    }

    fn f_quantize_scaled(&self, x: &Tensor) -> Result<Quantized> {
        self.run(x, false)
    }

    fn f_fake_quantize(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.run(x, true)?.values.f_to_kind(x.kind())?)
    }
}

impl nn::Module for LSQQuant {
    /// Fake quantization, `quantize(x) * step_size`, in `x`'s dtype.
    ///
    /// # Shapes
    /// - `xs`: any shape; the output has the same shape.
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.f_fake_quantize(xs).unwrap_or_else(|e| panic!("{e}"))
    }
}

#[derive(Debug, Clone, Copy)]
struct LsqNode {
    int_max: i64,
    rounded: bool,
    dequantize: bool,
    kind: Kind,
    grad_scale: f64,
}

/// `round(clamp(x / s, -int_max, int_max))`, times `s` if dequantized.
fn lsq_values(x: &Tensor, s: &Tensor, n: &LsqNode) -> Result<Tensor> {
    let im = n.int_max as f64;
    let mut v = x.f_detach()?.f_to_kind(n.kind)?.f_div(s)?.f_clamp_(-im, im)?;
    if n.rounded {
        v = v.f_round_()?;
    }
    if n.dequantize {
        v = v.f_mul_(s)?;
    }
    Ok(v)
}

/// Inputs `[x, step_size, s (effective, 0-dim), scale]`; saves `x`, `step_size`, `s` and `scale`.
fn lsq_forward(n: &LsqNode, t: &[Tensor]) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let values = lsq_values(&t[0], &t[2], n)?;
    Ok((vec![values], t.iter().map(|t| t.shallow_clone()).collect()))
}

fn lsq_backward(
    n: &LsqNode,
    saved: &[Tensor],
    grads: &[Tensor],
    needs: &[bool],
    _owned: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let (x, step, s, scale) = (&saved[0], &saved[1], &saved[2], &saved[3]);
    let im = n.int_max as f64;
    let g = grads[0].f_to_kind(n.kind)?;
    let v = x.f_to_kind(n.kind)?.f_div(s)?;
    let inside = v.f_abs()?.f_lt(im)?;
    // Integer outputs: the same gradients over s, the scale being a constant.
    let per = |t: Tensor| -> Result<Tensor> { Ok(if n.dequantize { t } else { t.f_mul(scale)? }) };
    let gx =
        if needs[0] { Some(per(g.f_where_scalarother(&inside, 0.0)?)?.f_to_kind(x.kind())?) } else { None };
    let gs = if needs[1] {
        let rounded = if n.rounded { v.f_round()? } else { v.shallow_clone() };
        let within = rounded.f_sub(&v)?;
        // Outside: sign(v) * int_max; NaN compares false everywhere and is dropped by the selects.
        let outside = v.f_sign()?.f_mul_scalar(im)?;
        let d = within.f_where_self(&inside, &outside)?;
        let keep = v.f_isnan()?.f_logical_not()?;
        let sum =
            per(g.f_mul(&d)?.f_where_scalarother(&keep, 0.0)?.f_sum(n.kind)?)?.f_mul_scalar(n.grad_scale)?;
        Some(sum.f_reshape(step.size())?.f_to_kind(step.kind())?)
    } else {
        None
    };
    Ok(vec![gx, gs])
}
