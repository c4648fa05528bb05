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
/// - a one-channel convolution takes the tangent `dq_x/dalpha` as a second input channel
///   whose weight is zero in value with `d/dalpha = q_w`: `op`'s own weight gradient then
///   carries alpha's, for one slightly wider op. The accumulator gains only zero products,
///   and its sums of integers stay exact, so the values are those of `op(q_x, q_w)`;
/// - other ops run once more, `op(dq_x/dalpha, q_w)`, times `alpha - alpha.detach()`.
pub(crate) fn forward(
    p: &PACTQuant,
    x: &Tensor,
    qw: &Tensor,
    one_channel: bool,
    op: &impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
) -> Result<(Quantized, Tensor)> {
    check_defined(x, "layer input")?;
    let qx = tch::no_grad(|| p.f_quantize_scaled(x))?;
    let tangent = p.f_alpha_tangent(x)?;
    let delta = alpha_delta(p.alpha())?;
    // Batched inputs only: an unbatched `[C, H, W]` would join along its rows.
    let acc = if one_channel && x.dim() == 4 {
        let zero = qw.f_detach()?.f_mul(&delta)?;
        let xs = Tensor::f_cat(&[&qx.values, &tangent], 1)?;
        op(&xs, &Tensor::f_cat(&[qw, &zero], 1)?, None)?
    } else {
        let acc = op(&qx.values, qw, None)?;
        acc.f_add(&op(&tangent, &qw.f_detach()?, None)?.f_mul(&delta)?)?
    };
    Ok((qx, acc))
}

/// `alpha - alpha.detach()` as a 0-dim tensor: exactly zero in value (and zero for a
/// non-finite alpha, which gets no gradient), with d/dalpha = 1.
fn alpha_delta(alpha: &Tensor) -> Result<Tensor> {
    let alpha = alpha.f_reshape([])?;
    Ok(alpha.f_sub(&alpha.f_detach()?)?.f_where_scalarother(&alpha.f_isfinite()?, 0.0)?)
}
