//! `MinMaxQuant`: scale from the tensor's own absolute maximum; nothing to learn.

use std::borrow::Borrow;
use std::sync::Mutex;

use tch::{nn, Device, Kind, Tensor};

use super::kernels::{self, MinMaxOut};
use crate::glue;

use super::approx_quantizer::{
    check_defined, check_int_max, check_out, compute_kind, copy_fake_quantized, count_nonfinite,
    grad_enabled, scale_for,
};
use super::{check_bitwidth, ApproxQuantizer, NonFinite, QuantConfig, Quantized, RangeMode};
use crate::{Error, Result};

/// The smallest range MinMax divides by: below it the scale would overflow float32.
pub const MIN_RANGE: f64 = 1e-30;

/// Min/Max quantizer: `round(clamp(x, -m, m) * int_max / m)` with `m = max|x|`.
///
/// `m` is taken without gradient over the finite elements of `x`; an input
/// with no non-zero finite element uses `m = 1` and ranges below
/// [`MIN_RANGE`] are raised to it, so the scale is always finite. Dequantized values
/// saturate at the dtype's largest finite value: with a range near it and 2 or 3 bits the
/// scale is subnormal, and a finite input still gives a finite output. Each call
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
    /// The running range variable and its momentum, in [`RangeMode::Running`].
    running: Option<(Tensor, f64)>,
}

impl MinMaxQuant {
    /// A MinMax quantizer with `bitwidth` bits whose state (none in the default
    /// [`RangeMode::Batch`]) lives under `path`, or an error outside `2..=16`.
    pub fn f_new<'a, P: Borrow<nn::Path<'a>>>(path: P, bitwidth: u32) -> Result<Self> {
        Self::from_config(path, QuantConfig::with_bitwidth(bitwidth))
    }

    /// Like [`f_new`](Self::f_new), panicking on a bad bitwidth.
    pub fn new<'a, P: Borrow<nn::Path<'a>>>(path: P, bitwidth: u32) -> Self {
        Self::f_new(path, bitwidth).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A MinMax quantizer from a full configuration whose state (the running range of
    /// [`RangeMode::Running`], a variable `running_max` of shape `[1]`) lives under `path`.
    pub fn from_config<'a, P: Borrow<nn::Path<'a>>>(path: P, config: QuantConfig) -> Result<Self> {
        let mut q = Self::stateless(config)?;
        if let (RangeMode::Running { momentum }, false) = (config.range, config.per_channel) {
            if !(0.0..1.0).contains(&momentum) {
                return Err(Error::Argument {
                    what: "running range momentum",
                    value: momentum,
                    expected: "in [0, 1)",
                });
            }
            q.running = Some((path.borrow().f_zeros_no_train("running_max", &[1])?, momentum));
        }
        Ok(q)
    }

    /// A quantizer of `config` that keeps no state (its range is each call's), for the
    /// crate's own one-off uses such as post-training weight quantization.
    pub(crate) fn stateless(config: QuantConfig) -> Result<Self> {
        Ok(Self {
            bitwidth: check_bitwidth(config.bitwidth)?,
            nonfinite: config.nonfinite,
            rounded: config.rounded,
            per_channel: config.per_channel,
            last_scales: Mutex::new(Vec::new()),
            running: None,
        })
    }

    /// The running range (0 before any training batch), `None` in [`RangeMode::Batch`].
    pub fn running_range(&self) -> Option<f64> {
        self.running.as_ref().map(|(r, _)| r.double_value(&[0]))
    }

    pub(crate) fn running_tensor(&self) -> Option<&Tensor> {
        self.running.as_ref().map(|(r, _)| r)
    }

    /// Sets the running range (calibration); no effect in [`RangeMode::Batch`].
    pub fn set_running_range(&self, range: f64) -> Result<()> {
        crate::args::check_positive("running range", range)?;
        if let Some((r, _)) = &self.running {
            let _ = tch::no_grad(|| r.shallow_clone().f_fill_(range))?;
        }
        Ok(())
    }

    /// The range to quantize with, given this call's own: the running range where there is
    /// one (updated first in training), else the call's. In training the call's range goes
    /// through the data-parallel hook first ([`set_range_sync`](super::set_range_sync)).
    fn range_for(&self, batch_range: f64, train: bool) -> Result<f64> {
        let batch_range = if train { super::sync::synced(batch_range)? } else { batch_range };
        let Some((r, momentum)) = &self.running else { return Ok(batch_range) };
        let current = r.f_double_value(&[0])?;
        if train {
            let next =
                if current > 0.0 { momentum * current + (1.0 - momentum) * batch_range } else { batch_range };
            let _ = tch::no_grad(|| r.shallow_clone().f_fill_(next))?;
            Ok(effective_range(next))
        } else if current > 0.0 {
            Ok(effective_range(current))
        } else {
            Ok(batch_range)
        }
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

    /// Dtype and the input's own range for the fused CPU kernels, or `None` where they do not
    /// apply (per channel, unrounded, CUDA, strided, half precision, empty or non-finite input).
    fn kernel_plan(&self, x: &Tensor) -> Option<(Kind, f64)> {
        if self.per_channel || !self.rounded {
            return None;
        }
        let kind = kernels::eligible(x)?;
        let (max_abs, finite) = kernels::abs_max(x, kind);
        if !finite {
            return None;
        }
        Some((kind, effective_range(max_abs)))
    }

    /// This call's plan for a fused layer node, with the state updated as [`run`](Self::run)
    /// updates it, where the kernels take `x`.
    pub(crate) fn f_fused_plan(&self, x: &Tensor, train: bool) -> Result<Option<super::FusedQuant>> {
        check_defined(x, "input")?;
        if !self.fusable(x) {
            return Ok(None);
        }
        let Some((kind, batch_range)) = self.kernel_plan(x) else { return Ok(None) };
        let (range, scale) = self.range_and_scale(batch_range, kind, train)?;
        self.store_scales(vec![scale]);
        Ok(Some(super::FusedQuant::MinMax { range, scale }))
    }

    /// Whether a fused plan may apply to `x`, without reading it: per tensor, rounded, `x`
    /// eligible for the kernels (a non-finite `x` is found only by the plan).
    pub(crate) fn fusable(&self, x: &Tensor) -> bool {
        !self.per_channel && self.rounded && kernels::eligible(x).is_some()
    }

    /// The range to quantize with ([`range_for`](Self::range_for)) and its scale in `kind`.
    fn range_and_scale(&self, batch_range: f64, kind: Kind, train: bool) -> Result<(f64, f64)> {
        let range = self.range_for(batch_range, train)?;
        Ok((range, scale_for(self.int_max(), range, kind)))
    }

    /// [`f_quantize_scaled`](ApproxQuantizer::f_quantize_scaled) writing the integers into
    /// `into` where the fused kernel runs and `into` fits `x` (a rewritten TorchScript layer's
    /// kept weight buffer or the thread's scratch, which no other tensor shares); the values
    /// then share its memory.
    pub(crate) fn f_quantize_scaled_into(&self, x: &Tensor, into: Option<&Tensor>) -> Result<Quantized> {
        self.run_into(x, false, false, into)
    }

    /// Quantizes `x` (integers, or with `dequantize` their values over the scale) and keeps
    /// the scales; with a gradient to compute, as one autograd node.
    fn run(&self, x: &Tensor, dequantize: bool, train: bool) -> Result<Quantized> {
        self.run_into(x, dequantize, train, None)
    }

    /// [`run`](Self::run), the kernel's output written into `into` where it fits.
    fn run_into(
        &self,
        x: &Tensor,
        dequantize: bool,
        train: bool,
        into: Option<&Tensor>,
    ) -> Result<Quantized> {
        check_defined(x, "input")?;
        let kind = compute_kind(x)?;
        let grad = x.requires_grad() && grad_enabled();
        if let Some((kind, batch_range)) = self.kernel_plan(x) {
            let (range, scale) = self.range_and_scale(batch_range, kind, train)?;
            let into = into.filter(|b| kernels::writable(b, x));
            let node = MinMaxNode {
                kind,
                dequantize,
                finite: true,
                rounded: true,
                plan: Plan::Kernel { range, scale, into: into.is_some() },
            };
            let values = match into {
                Some(b) => node.values(&[x, b], grad)?,
                None => node.values(&[x], grad)?,
            };
            self.store_scales(vec![scale]);
            let scale =
                if dequantize { Tensor::new() } else { Tensor::f_scalar_tensor(scale, (kind, Device::Cpu))? };
            return Ok(Quantized { values, scale });
        }
        let xd = x.f_detach()?.f_to_kind(kind)?;
        let base =
            MinMaxNode { kind, dequantize, finite: true, rounded: self.rounded, plan: Plan::PerChannel };
        let (values, scale, host) = if self.per_channel && xd.dim() >= 2 && xd.numel() > 0 {
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
            self.reject_nonfinite(&xd, finite)?;
            let node = MinMaxNode { finite, ..base };
            (node.values(&[x, &m, &scale], grad)?, scale, scales)
        } else {
            let (batch_range, finite) = Self::range_of(&xd)?;
            self.reject_nonfinite(&xd, finite)?;
            let (range, scale) = self.range_and_scale(batch_range, kind, train)?;
            let node = MinMaxNode { finite, plan: Plan::PerTensor { range, scale }, ..base };
            (node.values(&[x], grad)?, Tensor::f_scalar_tensor(scale, (kind, x.device()))?, vec![scale])
        };
        self.store_scales(host);
        Ok(Quantized { values, scale: if dequantize { Tensor::new() } else { scale } })
    }

    fn reject_nonfinite(&self, xd: &Tensor, finite: bool) -> Result<()> {
        if !finite && self.nonfinite == NonFinite::Reject {
            return Err(Error::NonFinite { count: count_nonfinite(xd)?, numel: xd.numel() as i64 });
        }
        Ok(())
    }
}

/// How a MinMax node computes its values.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// The fused CPU kernel (contiguous, finite, rounded, per tensor); with `into`, writing
    /// into the node's second input, whose memory the values share.
    Kernel { range: f64, scale: f64, into: bool },
    /// libtorch ops with one range.
    PerTensor { range: f64, scale: f64 },
    /// libtorch ops with the ranges and scales given as the node's second and third inputs.
    PerChannel,
}

/// MinMax's autograd node: the values, and straight-through gradients `grad` (dequantized) or
/// `grad * scale` (integers), zero at non-finite inputs.
#[derive(Debug, Clone, Copy)]
struct MinMaxNode {
    kind: Kind,
    dequantize: bool,
    /// Whether every input element is finite (otherwise the backward masks the others out).
    finite: bool,
    rounded: bool,
    plan: Plan,
}

impl MinMaxNode {
    /// The values of `inputs` (`x`, then the per-channel ranges and scales), as a node when `grad`.
    fn values(self, inputs: &[&Tensor], grad: bool) -> Result<Tensor> {
        if grad {
            Ok(glue::apply(self, inputs, minmax_forward, minmax_backward)?.remove(0))
        } else {
            let _guard = tch::no_grad_guard();
            let t: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
            Ok(minmax_forward(&self, &t)?.0.remove(0))
        }
    }
}

fn minmax_forward(n: &MinMaxNode, t: &[Tensor]) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let x = &t[0];
    let values = match n.plan {
        Plan::Kernel { range, scale, into } => {
            let out = if n.dequantize { MinMaxOut::Dequantized } else { MinMaxOut::Integers };
            if into {
                let mut dst = t[1].shallow_clone();
                kernels::minmax_to(x, n.kind, &mut dst, range, scale, out);
                // A new tensor on the buffer's memory: the node's output gets its own autograd
                // history, the buffer none.
                dst.f_detach()?
            } else {
                kernels::minmax(x, n.kind, range, scale, out)
            }
        }
        Plan::PerTensor { range, scale } => {
            let mut v = minmax_values(&x.f_to_kind(n.kind)?, range, scale, n.rounded)?;
            if n.dequantize {
                v = v.f_div_scalar_(scale)?;
                let top = kind_max(n.kind);
                if kernels::may_overflow(range * scale, scale, top) {
                    v = v.f_clamp_(-top, top)?;
                }
            }
            v
        }
        Plan::PerChannel => {
            let (m, scale) = (&t[1], &t[2]);
            let mut v = x
                .f_to_kind(n.kind)?
                .f_clamp_tensor(Some(m.f_neg()?), Some(m.shallow_clone()))?
                .f_mul_(scale)?;
            if n.rounded {
                v = v.f_round_()?;
            }
            if n.dequantize {
                // Saturated: a subnormal channel scale must not turn a finite value into ±inf.
                let top = kind_max(n.kind);
                v = v.f_div_(scale)?.f_clamp_(-top, top)?;
            }
            v
        }
    };
    // Only what the backward reads: x where some elements are not finite, the channel scales.
    let mut saved = vec![if n.finite { Tensor::new() } else { x.shallow_clone() }];
    if let (Plan::PerChannel, false) = (n.plan, n.dequantize) {
        saved.push(t[2].shallow_clone());
    }
    Ok((vec![values], saved))
}

fn minmax_backward(
    n: &MinMaxNode,
    saved: &[Tensor],
    grads: &[Tensor],
    needs: &[bool],
    owned: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    if !needs[0] {
        return Ok(vec![None]);
    }
    let g = &grads[0];
    let mut gx = match (n.dequantize, n.plan) {
        (true, _) => g.shallow_clone(),
        // A weight's gradient nobody else holds is scaled in place: a fresh weight-sized
        // tensor costs more in page faults than the multiply (alexnet's 58M weights).
        (false, Plan::Kernel { scale, .. } | Plan::PerTensor { scale, .. }) if owned[0] => {
            g.shallow_clone().f_mul_scalar_(scale)?
        }
        (false, Plan::Kernel { scale, .. } | Plan::PerTensor { scale, .. }) => g.f_mul_scalar(scale)?,
        (false, Plan::PerChannel) => g.f_mul(&saved[1])?,
    };
    if !n.finite {
        // inf - inf is NaN: keep those elements' gradient out.
        gx = gx.f_where_scalarother(&saved[0].f_isfinite()?, 0.0)?;
    }
    Ok(vec![Some(gx)])
}

impl ApproxQuantizer for MinMaxQuant {
    fn bitwidth(&self) -> u32 {
        self.bitwidth
    }

    /// The scale of the last call, 0.0 before any; per channel, the smallest (coarsest) one.
    fn scale_factor(&self) -> f64 {
        self.scale_factors().into_iter().reduce(f64::min).unwrap_or(0.0)
    }

    /// In [`RangeMode::Running`], evaluation: the running range, frozen.
    fn f_quantize_scaled(&self, x: &Tensor) -> Result<Quantized> {
        self.run(x, false, false)
    }

    fn f_quantize_scaled_t(&self, x: &Tensor, train: bool) -> Result<Quantized> {
        self.run(x, false, train)
    }

    fn f_fake_quantize_out(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        check_out(x, out)?;
        let _guard = tch::no_grad_guard();
        // An `out` sharing memory with `x` would be written while read: compute aside, then copy.
        let direct = kernels::writable(out, x);
        match direct.then(|| self.kernel_plan(x)).flatten() {
            Some((kind, batch_range)) => {
                let (range, scale) = self.range_and_scale(batch_range, kind, false)?;
                kernels::minmax_to(x, kind, out, range, scale, MinMaxOut::Dequantized);
                self.store_scales(vec![scale]);
                Ok(())
            }
            None => copy_fake_quantized(self, x, out),
        }
    }

    fn f_fake_quantize(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.run(x, true, false)?.values.f_to_kind(x.kind())?)
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

/// The compute dtype's largest finite value.
pub(crate) fn kind_max(kind: Kind) -> f64 {
    if kind == Kind::Double {
        f64::MAX
    } else {
        f32::MAX as f64
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
    let grad = x.requires_grad() && grad_enabled();
    // Only a gradient needs to know (one sync) whether some elements are not finite.
    let finite = !grad || x.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0;
    let plan = Plan::PerTensor { range: minmax, scale };
    MinMaxNode { kind, dequantize: false, finite, rounded: true, plan }.values(&[x], grad)
}

/// Like [`f_minmax_quant`], panicking on error.
pub fn minmax_quant(x: &Tensor, minmax: f64, int_max: i64) -> Tensor {
    f_minmax_quant(x, minmax, int_max).unwrap_or_else(|e| panic!("{e}"))
}
