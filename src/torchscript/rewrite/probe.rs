//! A traced `nn.MultiheadAttention`'s settings, recovered by running it: tracing keeps
//! neither `num_heads` nor `batch_first`, nor which of its inputs are query, key and value, so
//! its forward is run on fixed probes and compared with PyTorch's computation for every head
//! count, layout and assignment of the inputs.

use tch::{CModule, Kind, Tensor};

use super::TracedAttention;
use crate::glue::jit;
use crate::Result;

/// The projections' tensors of an attention: the query's, key's and value's weights (rows of
/// the packed `in_proj_weight`, or the separate `q/k/v_proj_weight`).
pub(super) struct AttentionWeights {
    /// `[E, E]`, `[E, kdim]`, `[E, vdim]`.
    pub qkv: [Tensor; 3],
    /// The packed input bias, `[3 E]`.
    pub in_bias: Option<Tensor>,
    /// `out_proj.weight`, `[E, E]`.
    pub out_weight: Tensor,
    /// `out_proj.bias`, `[E]`.
    pub out_bias: Option<Tensor>,
}

/// `nn.MultiheadAttention`'s attention in float, as PyTorch computes it (no masks, no
/// dropout): the output and the per-head weights.
///
/// # Shapes
/// `q` is `[L, N, E]`, `k` and `v` are `[S, N, kdim]` and `[S, N, vdim]` (batch first when
/// `batch_first`); the output has `q`'s shape, the weights are `[N, heads, L, S]`.
pub(super) fn attention(
    [q, k, v]: [&Tensor; 3],
    w: &AttentionWeights,
    heads: i64,
    batch_first: bool,
) -> Result<(Tensor, Tensor)> {
    let seq_first = |t: &Tensor| if batch_first { t.f_transpose(0, 1) } else { Ok(t.shallow_clone()) };
    let (q, k, v) = (seq_first(q)?, seq_first(k)?, seq_first(v)?);
    let [l, n, e] = <[i64; 3]>::try_from(q.size()).expect("a 3-d probe");
    let s = k.size()[0];
    let head_dim = e / heads;
    let bias = |i: i64| w.in_bias.as_ref().map(|b| b.narrow(0, i * e, e));
    let project = |x: &Tensor, i: usize, len: i64| -> Result<Tensor> {
        Ok(x.f_linear(&w.qkv[i], bias(i as i64).as_ref())?
            .f_reshape([len, n * heads, head_dim])?
            .f_transpose(0, 1)?)
    };
    let q = project(&q, 0, l)?.f_mul_scalar(1.0 / (head_dim as f64).sqrt())?;
    let (k, v) = (project(&k, 1, s)?, project(&v, 2, s)?);
    let weights = q.f_bmm(&k.f_transpose(1, 2)?)?.f_softmax(-1, q.kind())?;
    let out = weights.f_bmm(&v)?.f_transpose(0, 1)?.f_reshape([l * n, e])?;
    let out = out.f_linear(&w.out_weight, w.out_bias.as_ref())?.f_reshape([l, n, e])?;
    let out = if batch_first { out.f_transpose(0, 1)? } else { out };
    Ok((out, weights.f_reshape([n, heads, l, s])?))
}

/// Whether `a` equals `b` up to float summation order, relative to `b`'s largest magnitude.
fn same(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.size() != b.size() {
        return Ok(false);
    }
    let scale = b.f_abs()?.f_max()?.f_double_value(&[])?;
    Ok(a.f_sub(b)?.f_abs()?.f_max()?.f_double_value(&[])? <= 1e-4 * scale)
}

/// The ways `n` traced inputs can be query, key and value: tracing passes a tensor given
/// twice once, in the order of first use, so the query is input 0 and each input is used.
fn assignments(n: usize) -> Vec<[usize; 3]> {
    let mut out = Vec::new();
    // Numbered in order of first use: the key is input 0 or 1, the value at most one past it.
    for k in 0..n.min(2) {
        for v in 0..(k + 2).min(n) {
            let roles = [0, k, v];
            if (0..n).all(|i| roles.contains(&i)) {
                out.push(roles);
            }
        }
    }
    out
}

/// The head count, input roles, layout and outputs of the traced attention at `path` whose
/// forward has the schema `schema`; `Err` says in words why it cannot be rewritten.
pub(super) fn traced_attention(
    m: &CModule,
    path: &str,
    schema: &str,
    w: &AttentionWeights,
) -> Result<std::result::Result<(TracedAttention, bool), String>> {
    // `forward(Type self, Tensor argument_1) -> Tensor`: the inputs besides self.
    let inputs = schema.split_once('(').and_then(|(_, r)| r.split_once(')')).map(|(args, _)| args);
    let inputs = inputs.map_or(0, |a| a.split(", ").count().saturating_sub(1));
    if !(1..=3).contains(&inputs) {
        return Ok(Err(format!(
            "a traced MultiheadAttention is covered with one to three inputs (query, key, value) and no masks; this one takes {inputs}"
        )));
    }
    let e = w.out_weight.size()[0];
    let width = |i: usize| w.qkv[i].size()[1];
    let options = (w.out_weight.kind(), w.out_weight.device());
    // Fixed probes, not random ones (the rewrite must not draw from the user's generator),
    // one per role; a role's width is its weight's.
    let probe = |role: usize| -> Result<Tensor> {
        let d = width(role);
        Ok(Tensor::f_arange(2 * 3 * d, options)?
            .f_mul_scalar(0.37)?
            .f_add_scalar(1.1 * role as f64)?
            .f_sin()?
            .f_reshape([2, 3, d])?)
    };
    let probes = [probe(0)?, probe(1)?, probe(2)?];
    // An input that plays two roles has both roles' width.
    let candidates: Vec<[usize; 3]> = assignments(inputs)
        .into_iter()
        .filter(|r| (0..3).all(|a| (0..3).all(|b| r[a] != r[b] || width(a) == width(b))))
        .collect();
    let mut found = Vec::new();
    let mut failures = Vec::new();
    for &sources in &candidates {
        // The input `i` is the probe of the first role it plays.
        let args: Vec<&Tensor> = (0..inputs)
            .map(|i| &probes[sources.iter().position(|&s| s == i).expect("every input used")])
            .collect();
        let roles = [args[sources[0]], args[sources[1]], args[sources[2]]];
        let traced = match tch::no_grad(|| jit::call_forward(m, path, &args)) {
            Ok(outputs) => outputs,
            Err(err) => {
                failures.push(err.to_string());
                continue;
            }
        };
        let outputs: Vec<&Tensor> = traced.iter().flatten().collect();
        if outputs.len() != traced.len() || !(1..=2).contains(&outputs.len()) {
            return Ok(Err(format!(
                "a traced MultiheadAttention that returns {} values, not its output (and its weights)",
                traced.len()
            )));
        }
        // A traced module returns its outputs in the order its caller first used them: the
        // output and the weights either way round.
        let orders: &[(usize, Option<usize>)] =
            if outputs.len() == 1 { &[(0, None)] } else { &[(0, Some(1)), (1, Some(0))] };
        for heads in (1..=e).filter(|h| e % h == 0) {
            for batch_first in [false, true] {
                let (o, wt) = tch::no_grad(|| attention(roles, w, heads, batch_first))?;
                for &(at, weights_at) in orders {
                    let weights = match weights_at.map(|i| outputs[i]) {
                        None => None,
                        Some(t) if t.dim() == 3 => {
                            let mean = wt.f_mean_dim(1, false, Kind::Float)?.f_to_kind(t.kind())?;
                            same(&mean, t)?.then_some(true)
                        }
                        Some(t) => same(&wt, t)?.then_some(false),
                    };
                    if same(&o, outputs[at])? && weights.is_some() == weights_at.is_some() {
                        let weights_first = at == 1;
                        found.push((TracedAttention { heads, sources, weights, weights_first }, batch_first));
                    }
                }
            }
        }
    }
    Ok(match found.as_slice() {
        [one] => Ok(*one),
        [] if failures.len() == candidates.len() => Err(format!(
            "its traced forward fails on probes of shape [2, 3, {e}]: {}",
            failures.first().map_or("", String::as_str)
        )),
        [] => Err("its traced forward is not MultiheadAttention's attention for any head count (traced with masks or dropout, or changed?)".into()),
        several => Err(format!(
            "its traced forward matches {} head counts, layouts or input roles on the probes (heads {:?}), so its own is unknown",
            several.len(),
            several.iter().map(|(t, _)| t.heads).collect::<Vec<_>>()
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::assignments;

    #[test]
    fn inputs_are_assigned_to_roles_in_order_of_first_use() {
        assert_eq!(assignments(1), [[0, 0, 0]]);
        assert_eq!(assignments(2), [[0, 0, 1], [0, 1, 0], [0, 1, 1]]);
        assert_eq!(assignments(3), [[0, 1, 2]]);
    }
}
