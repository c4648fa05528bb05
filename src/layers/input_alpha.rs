//! PACT alpha's gradient for a layer whose input needs none (a first layer's images),
//! without a backward pass to that input.

use tch::Tensor;

use crate::quantizers::{check_defined, ApproxQuantizer, PACTQuant, Quantized};
use crate::Result;

/// The quantized input and the integer accumulator `op(q_x, q_w)` of an `x` without gradient,
/// in a graph that gives `p`'s alpha its gradient `<dL/dacc, op(dq_x/dalpha, q_w)>`; `q_w` are
/// the weight's integer values. `one_channel` says that `op` is a convolution of one input
/// channel (and one group).
///
/// Differentiating `op` with respect to its input would cost more: for a one-channel
/// convolution, oneDNN's backward-data costs several forward passes. Instead:
/// - a one-channel convolution on the CPU takes the tangent `dq_x/dalpha` as a second input
///   channel whose weight is zero in value with `d/dalpha = q_w`: `op`'s own weight gradient
///   then carries alpha's, for one slightly wider op. The accumulator gains only zero
///   products, and where its sums of integers are exact in the compute dtype (`w_int_max`,
///   the weight's largest integer, bounds them) the values are those of `op(q_x, q_w)`;
/// - other ops run once more, `op(dq_x/dalpha, q_w)`, times `alpha - alpha.detach()`.
pub(crate) fn forward(
    p: &PACTQuant,
    x: &Tensor,
    qw: &Tensor,
    w_int_max: i64,
    one_channel: bool,
    op: &impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
) -> Result<(Quantized, Tensor)> {
    check_defined(x, "layer input")?;
    let qx = tch::no_grad(|| p.f_quantize_scaled(x))?;
    let tangent = p.f_alpha_tangent(x)?;
    let delta = alpha_delta(p.alpha())?;
    // Batched CPU inputs only (an unbatched `[C, H, W]` would join along its rows; CUDA's
    // convolutions are not measured here), and only where every sum is an exact integer, so
    // that the wider op cannot round differently from `op(q_x, q_w)`.
    let stack = one_channel
        && x.dim() == 4
        && x.device() == tch::Device::Cpu
        && exact_sums(p.int_max(), w_int_max, qw, qx.values.kind());
    let acc = if stack {
        let zero = qw.f_detach()?.f_mul(&delta)?;
        let xs = Tensor::f_cat(&[&qx.values, &tangent], 1)?;
        op(&xs, &Tensor::f_cat(&[qw, &zero], 1)?, None)?
    } else {
        let acc = op(&qx.values, qw, None)?;
        acc.f_add(&op(&tangent, &qw.f_detach()?, None)?.f_mul(&delta)?)?
    };
    Ok((qx, acc))
}

/// Whether every sum of `fan_in` products of integers up to `x_max` and `w_max` is exact in
/// `kind` (below 2^24 in float32, 2^53 in float64), whatever the order of the additions.
fn exact_sums(x_max: i64, w_max: i64, qw: &Tensor, kind: tch::Kind) -> bool {
    let fan_in = qw.numel() as f64 / qw.size().first().map_or(1, |&o| o.max(1)) as f64;
    let bound = if kind == tch::Kind::Double { 2f64.powi(53) } else { 2f64.powi(24) };
    // A factor 4 of margin: room for quantizers whose integers reach twice int_max.
    4.0 * x_max as f64 * w_max as f64 * fan_in < bound
}

/// `alpha - alpha.detach()` as a 0-dim tensor: exactly zero in value (and zero for a
/// non-finite alpha, which gets no gradient), with d/dalpha = 1.
fn alpha_delta(alpha: &Tensor) -> Result<Tensor> {
    let alpha = alpha.f_reshape([])?;
    Ok(alpha.f_sub(&alpha.f_detach()?)?.f_where_scalarother(&alpha.f_isfinite()?, 0.0)?)
}
