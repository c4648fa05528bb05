//! A traced `nn.MultiheadAttention`'s settings, recovered by running it: tracing keeps
//! neither `num_heads` nor `batch_first`, so its forward is run on a fixed probe and compared
//! with PyTorch's computation for every head count and layout.

use tch::{CModule, Kind, Tensor};

use super::TracedAttention;
use crate::glue::jit;
use crate::Result;

/// The projections' tensors of an attention.
pub(super) struct AttentionWeights {
    /// The packed input projection, `[3 E, E]`.
    pub in_weight: Tensor,
    /// Its bias, `[3 E]`.
    pub in_bias: Option<Tensor>,
    /// `out_proj.weight`, `[E, E]`.
    pub out_weight: Tensor,
    /// `out_proj.bias`, `[E]`.
    pub out_bias: Option<Tensor>,
}

/// `nn.MultiheadAttention`'s self-attention in float, as PyTorch computes it (packed input
/// projection, no masks, no dropout): the output and the per-head weights.
///
/// # Shapes
/// `x` is `[L, N, E]` (`[N, L, E]` when `batch_first`); the output has `x`'s shape, the
/// weights are `[N, heads, L, L]`.
pub(super) fn self_attention(
    x: &Tensor,
    w: &AttentionWeights,
    heads: i64,
    batch_first: bool,
) -> Result<(Tensor, Tensor)> {
    let x = if batch_first { x.f_transpose(0, 1)? } else { x.shallow_clone() };
    let [l, n, e] = <[i64; 3]>::try_from(x.size()).expect("a 3-d probe");
    let head_dim = e / heads;
    let qkv = x.f_linear(&w.in_weight, w.in_bias.as_ref())?.f_chunk(3, -1)?;
    let split = |t: &Tensor| t.f_reshape([l, n * heads, head_dim])?.f_transpose(0, 1);
    let q = split(&qkv[0])?.f_mul_scalar(1.0 / (head_dim as f64).sqrt())?;
    let (k, v) = (split(&qkv[1])?, split(&qkv[2])?);
    let weights = q.f_bmm(&k.f_transpose(1, 2)?)?.f_softmax(-1, q.kind())?;
    let out = weights.f_bmm(&v)?.f_transpose(0, 1)?.f_reshape([l * n, e])?;
    let out = out.f_linear(&w.out_weight, w.out_bias.as_ref())?.f_reshape([l, n, e])?;
    let out = if batch_first { out.f_transpose(0, 1)? } else { out };
    Ok((out, weights.f_reshape([n, heads, l, l])?))
}

/// Whether `a` equals `b` up to float summation order, relative to `b`'s largest magnitude.
fn same(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.size() != b.size() {
        return Ok(false);
    }
    let scale = b.f_abs()?.f_max()?.f_double_value(&[])?;
    Ok(a.f_sub(b)?.f_abs()?.f_max()?.f_double_value(&[])? <= 1e-4 * scale)
}

/// The head count, layout and outputs of the traced attention at `path` whose forward has the
/// schema `schema`; `Err` says in words why it cannot be rewritten.
pub(super) fn traced_attention(
    m: &CModule,
    path: &str,
    schema: &str,
    w: &AttentionWeights,
) -> Result<std::result::Result<(TracedAttention, bool), String>> {
    // `forward(Type self, Tensor argument_1) -> Tensor`: one input besides self.
    let inputs = schema.split_once('(').and_then(|(_, r)| r.split_once(')')).map(|(args, _)| args);
    let inputs = inputs.map_or(0, |a| a.split(", ").count().saturating_sub(1));
    if inputs != 1 {
        return Ok(Err(format!(
            "a traced MultiheadAttention is covered as self-attention with one input and no masks; this one takes {inputs}"
        )));
    }
    let e = w.out_weight.size()[0];
    let options = (w.in_weight.kind(), w.in_weight.device());
    // A fixed probe, not a random one: the rewrite must not draw from the user's generator.
    let probe = Tensor::f_arange(2 * 3 * e, options)?.f_mul_scalar(0.37)?.f_sin()?.f_reshape([2, 3, e])?;
    let traced = match tch::no_grad(|| jit::call_forward(m, path, &[&probe])) {
        Ok(outputs) => outputs,
        Err(err) => {
            return Ok(Err(format!("its traced forward fails on a probe of shape [2, 3, {e}]: {err}")))
        }
    };
    let Some(Some(out)) = traced.first() else {
        return Ok(Err("a traced MultiheadAttention that returns no output tensor".into()));
    };
    let weights = match traced.get(1) {
        None => None,
        Some(Some(wt)) if wt.dim() == 3 => Some((true, wt)),
        Some(Some(wt)) if wt.dim() == 4 => Some((false, wt)),
        Some(_) => {
            return Ok(Err("a traced MultiheadAttention whose second output is not its weights".into()))
        }
    };
    let mut found = Vec::new();
    for heads in (1..=e).filter(|h| e % h == 0) {
        for batch_first in [false, true] {
            let (o, wt) = tch::no_grad(|| self_attention(&probe, w, heads, batch_first))?;
            let weights_match = match weights {
                None => true,
                Some((true, t)) => same(&wt.f_mean_dim(1, false, Kind::Float)?.f_to_kind(t.kind())?, t)?,
                Some((false, t)) => same(&wt, t)?,
            };
            if same(&o, out)? && weights_match {
                found.push((
                    TracedAttention { heads, weights: weights.map(|(average, _)| average) },
                    batch_first,
                ));
            }
        }
    }
    Ok(match found.as_slice() {
        [one] => Ok(*one),
        [] => Err("its traced forward is not MultiheadAttention's self-attention for any head count (traced with dropout, or changed?)".into()),
        several => Err(format!(
            "its traced forward matches {} head counts or layouts on the probe (heads {:?}), so its own is unknown",
            several.len(),
            several.iter().map(|(t, _)| t.heads).collect::<Vec<_>>()
        )),
    })
}
