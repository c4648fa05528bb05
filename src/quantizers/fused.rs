//! A quantizer fixed for one call, as a fused layer node runs it: its integers and its
//! straight-through gradients as plain passes, without an autograd node of its own.

use tch::{Kind, Tensor};

use super::kernels::{self, Grad, MinMaxOut};
use super::pact::HostAlpha;
use super::Quantizer;
use crate::{Error, Result};

/// One quantizer's parameters for one call, read (and its state updated) before the node runs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum FusedQuant {
    /// PACT with its alpha read on the host; `alpha` learns.
    Pact { int_max: i64, host: HostAlpha },
    /// MinMax per tensor over a finite input, with the range and scale of this call.
    MinMax { range: f64, scale: f64 },
}

impl Quantizer {
    /// This call's plan for `x` (a running range updated as [`f_quantize_scaled_t`] does), or
    /// `None` where `x` or the quantizer needs the general path (LSQ, per channel, unrounded,
    /// CUDA, strided, half precision, non-finite).
    ///
    /// [`f_quantize_scaled_t`]: super::ApproxQuantizer::f_quantize_scaled_t
    pub(crate) fn f_fused_plan(&self, x: &Tensor, train: bool) -> Result<Option<FusedQuant>> {
        match self {
            Self::Pact(p) => p.f_fused_plan(x),
            Self::MinMax(m) => m.f_fused_plan(x, train),
            Self::Lsq(_) => Ok(None),
        }
    }
}

impl Quantizer {
    /// Whether [`f_fused_plan`](Self::f_fused_plan) may return a plan for `x`, without
    /// reading `x` (only a non-finite `x` can still turn it down).
    pub(crate) fn fusable(&self, x: &Tensor) -> bool {
        match self {
            Self::Pact(p) => p.fusable(x),
            Self::MinMax(m) => m.fusable(x),
            Self::Lsq(_) => false,
        }
    }
}

impl FusedQuant {
    /// The scale from values to integers, as the compute dtype rounds it.
    pub(crate) fn scale(self) -> f64 {
        match self {
            Self::Pact { host, .. } => host.scale,
            Self::MinMax { scale, .. } => scale,
        }
    }

    /// Whether the quantizer has a variable that learns (PACT's alpha).
    pub(crate) fn learns(self) -> bool {
        matches!(self, Self::Pact { .. })
    }

    /// The integers of `x` (eligible for the kernels, of dtype `kind`).
    pub(crate) fn values(self, x: &Tensor, kind: Kind) -> Tensor {
        match self {
            Self::Pact { int_max, host } => kernels::pact(x, kind, host.scale, int_max, false),
            Self::MinMax { range, scale } => kernels::minmax(x, kind, range, scale, MinMaxOut::Integers),
        }
    }

    /// `d integers / d alpha` under PACT's straight-through rule (`±scale` where clipped);
    /// `None` for a quantizer without alpha.
    pub(crate) fn tangent(self, x: &Tensor, kind: Kind) -> Option<Tensor> {
        match self {
            Self::Pact { host, .. } => Some(kernels::pact_sign(x, kind, host.alpha, host.scale)),
            Self::MinMax { .. } => None,
        }
    }

    /// Alpha's gradient from its reduction `sum`, scaled already: 0 for a non-finite alpha,
    /// and for a quantizer without alpha.
    pub(crate) fn alpha_gradient(self, sum: f64) -> f64 {
        match self {
            Self::Pact { host, .. } => host.alpha_gradient(sum),
            Self::MinMax { .. } => 0.0,
        }
    }

    /// The gradients of `x` (where `want_x`) and of alpha (where `want_alpha`, 0 for a
    /// non-finite alpha) from `g`, the gradient of the integers times `1 / per`; the same
    /// passes as the quantizers' own nodes, with `per` folded into their scale.
    pub(crate) fn backward(
        self,
        x: &Tensor,
        kind: Kind,
        g: &Tensor,
        per: f64,
        want_x: bool,
        want_alpha: bool,
    ) -> Result<(Option<Tensor>, f64)> {
        match self {
            Self::Pact { host, .. } => {
                // The op's gradient has x's shape; dtype and layout as the kernel reads them.
                let g = g.f_to_kind(kind)?.f_contiguous()?;
                let gk = Grad::of(&g, x).ok_or_else(|| Error::Shape {
                    what: "gradient of a quantized input".into(),
                    expected: format!("{:?}", x.size()),
                    actual: g.size(),
                })?;
                let f = host.scale * per;
                let (gx, sum) = kernels::pact_backward(x, kind, gk, host.alpha, f, want_x);
                Ok((gx, if want_alpha { host.alpha_gradient(sum * f) } else { 0.0 }))
            }
            Self::MinMax { scale, .. } => Ok((want_x.then(|| g.f_mul_scalar(scale * per)).transpose()?, 0.0)),
        }
    }
}
