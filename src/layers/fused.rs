//! A Quantized-mode layer in training as one autograd node: both quantizers, the integer op,
//! the scales and the bias forward, and all their gradients in one backward.
//!
//! The general path builds the same graph from about eight nodes (two quantizers, the op, the
//! division, the bias and its view); on a small layer their bookkeeping costs more than the
//! arithmetic. The values are those of the general path bit for bit (the same kernels and ops
//! in the same order); the gradients are the same formulas.

use tch::{Kind, Tensor};

use super::LayerQuant;
use crate::glue;
use crate::glue::autograd::ConvGrads;
use crate::quantizers::{grad_enabled, FusedQuant, Quantizer};
use crate::Result;

/// A layer's integer operation, as its fused node runs it forward and backward.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OpGeom {
    /// `x W^T` over the last dimension.
    Linear,
    /// A 2-D convolution: `[stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups]`.
    Conv2d([i64; 7]),
}

impl OpGeom {
    /// The layer's float op, with an optional bias.
    pub(crate) fn forward(self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        Ok(match self {
            Self::Linear => x.f_linear(w, b)?,
            Self::Conv2d(g) => x.f_conv2d(w, b, [g[0], g[1]], [g[2], g[3]], [g[4], g[5]], g[6])?,
        })
    }

    /// How a per-channel tensor (a bias, per-channel scales) broadcasts over the output:
    /// along the last dimension, or along the channels before height and width.
    pub(crate) fn channel_shape(self) -> &'static [i64] {
        match self {
            Self::Linear => &[-1],
            Self::Conv2d(_) => &[-1, 1, 1],
        }
    }

    /// Whether the op is a convolution of one input channel and one group.
    pub(crate) fn one_channel(self, w: &Tensor) -> bool {
        matches!(self, Self::Conv2d(g) if g[6] == 1) && w.size().get(1) == Some(&1)
    }

    /// The gradients of `x`, `w` and the bias (where `want` asks) from the output's gradient `g`.
    fn backward(self, g: &Tensor, x: &Tensor, w: &Tensor, want: [bool; 3]) -> Result<ConvGrads> {
        match self {
            Self::Linear => {
                let gx = want[0].then(|| g.f_matmul(w)).transpose()?;
                let (o, i) = (w.size()[0], w.size()[1]);
                let gw = want[1]
                    .then(|| g.f_reshape([-1, o])?.f_tr()?.f_mm(&x.f_reshape([-1, i])?))
                    .transpose()?;
                // Summed over every dimension but the last; an unbatched output is the bias's
                // shape already (an empty list would sum all).
                let dims: Vec<i64> = (0..g.dim() as i64 - 1).collect();
                let gb = match (want[2], dims.is_empty()) {
                    (false, _) => None,
                    (true, true) => Some(g.copy()),
                    (true, false) => Some(g.f_sum_dim_intlist(dims, false, g.kind())?),
                };
                Ok((gx, gw, gb))
            }
            // libtorch's backward takes a batch: an unbatched input is a batch of one.
            Self::Conv2d(geometry) if x.dim() == 3 => {
                let (gx, gw, gb) = glue::autograd::convolution_backward(
                    &g.f_unsqueeze(0)?,
                    &x.f_unsqueeze(0)?,
                    w,
                    geometry,
                    want,
                )?;
                Ok((gx.map(|t| t.f_squeeze_dim(0)).transpose()?, gw, gb))
            }
            Self::Conv2d(geometry) => glue::autograd::convolution_backward(g, x, w, geometry, want),
        }
    }
}

/// What the node needs besides its tensors.
#[derive(Debug, Clone, Copy)]
struct Node {
    x: FusedQuant,
    w: FusedQuant,
    geom: OpGeom,
    kind: Kind,
    /// `s_x * s_w`, rounded as the compute dtype rounds it.
    scale: f64,
    bias: bool,
    /// Whether PACT's alpha is the node's last input.
    alpha: bool,
}

/// The layer's Quantized-mode output as one node, or `None` where the general path must run it
/// (no gradient to compute, a quantizer or input the kernels do not take).
pub(crate) fn forward(
    q: &LayerQuant,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    train: bool,
    geom: OpGeom,
) -> Result<Option<Tensor>> {
    let alpha = match &q.x_quantizer {
        Quantizer::Pact(p) => Some(p.alpha()),
        _ => None,
    };
    let learns = |t: Option<&Tensor>| t.is_some_and(|t| t.requires_grad());
    let grad = x.requires_grad() || weight.requires_grad() || learns(bias) || learns(alpha);
    if !grad || !grad_enabled() || x.kind() != weight.kind() || tests::general() {
        return Ok(None);
    }
    // Neither plan changes any state unless it is returned; the weight's comes first, as the
    // general path quantizes the weight first. Checked beforehand so that only a non-finite
    // input can turn the second down after the first ran (its one effect, the weight's
    // scale stored, is then stored once more with the same value).
    let weight_only = matches!(q.w_quantizer, Quantizer::MinMax(_));
    if !weight_only || !q.w_quantizer.fusable(weight) || !q.x_quantizer.fusable(x) {
        return Ok(None);
    }
    let Some(w) = q.w_quantizer.f_fused_plan(weight, false)? else { return Ok(None) };
    let Some(xq) = q.x_quantizer.f_fused_plan(x, train)? else { return Ok(None) };
    let kind = x.kind();
    let scale = if kind == Kind::Float {
        (xq.scale() as f32 * w.scale() as f32) as f64
    } else {
        xq.scale() * w.scale()
    };
    let alpha = alpha.filter(|a| a.requires_grad());
    let node = Node { x: xq, w, geom, kind, scale, bias: bias.is_some(), alpha: alpha.is_some() };
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    inputs.extend(alpha);
    tests::count();
    Ok(Some(glue::apply(node, &inputs, node_forward, node_backward)?.remove(0)))
}

/// `op(q_x, q_w) / (s_x s_w) + b`, saving `x`, `q_x`, `q_w` (and alpha).
fn node_forward(n: &Node, t: &[Tensor]) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let (x, w) = (&t[0], &t[1]);
    let (qx, qw) = (n.x.values(x, n.kind), n.w.values(w, n.kind));
    // In place, as the general path: the accumulator is the node's own.
    let mut y = n.geom.forward(&qx, &qw, None)?;
    let _ = y.f_div_scalar_(n.scale)?;
    if n.bias {
        let _ = y.f_add_(&t[2].f_reshape(n.geom.channel_shape())?)?;
    }
    // x only where PACT's passes read it: a MinMax input keeps nothing of x, as its own
    // node does (x may then change in place after the layer).
    let x_saved = if n.x.learns() { x.shallow_clone() } else { Tensor::new() };
    let mut saved = vec![x_saved, qx, qw];
    if n.alpha {
        saved.push(t[t.len() - 1].shallow_clone());
    }
    Ok((vec![y], saved))
}

fn node_backward(
    n: &Node,
    saved: &[Tensor],
    grads: &[Tensor],
    needs: &[bool],
    _owned: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let (x, qx, qw, g) = (&saved[0], &saved[1], &saved[2], &grads[0]);
    let a = 2 + n.bias as usize;
    let (want_x, want_w, want_b, want_a) = (needs[0], needs[1], n.bias && needs[2], n.alpha && needs[a]);
    // The op's backward is linear in the gradient: it runs on `g` itself (whose sum is the
    // bias's gradient), and `1 / (s_x s_w)` joins the quantizers' scales in their passes,
    // which saves a pass over `g` and a tensor of its size.
    let per = 1.0 / n.scale;
    // Alpha learns through x's gradient where x needs one; otherwise through the tangent
    // dq_x/dalpha, without a backward pass to x (see `input_alpha`).
    let tangent = if want_a && !want_x { n.x.tangent(x, n.kind) } else { None };
    let (gqx, gqw, gb, ga_tangent) = match &tangent {
        // The tangent as a second input channel: the weight gradient carries alpha's.
        Some(t) if n.geom.one_channel(qw) => {
            let xs = Tensor::f_cat(&[qx, t], qx.dim() as i64 - 3)?;
            let w2 = Tensor::f_cat(&[qw, qw], 1)?;
            let (_, gw2, gb) = n.geom.backward(g, &xs, &w2, [false, true, want_b])?;
            let gw2 = gw2.ok_or(crate::Error::Undefined("convolution weight gradient"))?;
            let ga = gw2.f_narrow(1, 1, 1)?.f_mul(qw)?.f_sum(Kind::Double)?.f_double_value(&[])?;
            (None, want_w.then(|| gw2.f_narrow(1, 0, 1)).transpose()?, gb, ga)
        }
        Some(t) => {
            let (_, gqw, gb) = n.geom.backward(g, qx, qw, [false, want_w, want_b])?;
            let ga = n.geom.forward(t, qw, None)?.f_mul(g)?.f_sum(Kind::Double)?.f_double_value(&[])?;
            (None, gqw, gb, ga)
        }
        None => {
            let (gqx, gqw, gb) = n.geom.backward(g, qx, qw, [want_x || want_a, want_w, want_b])?;
            (gqx, gqw, gb, 0.0)
        }
    };
    let (gx, ga) = match gqx {
        Some(gqx) => n.x.backward(x, n.kind, &gqx, per, want_x, want_a)?,
        None => (None, n.x.alpha_gradient(ga_tangent * per)),
    };
    // The weight's quantizer is MinMax (see `forward`), whose pass reads no input.
    let gw = match gqw {
        Some(gqw) => n.w.backward(qw, n.kind, &gqw, per, true, false)?.0,
        None => None,
    };
    let mut out = vec![gx, gw];
    if n.bias {
        out.push(gb);
    }
    if n.alpha {
        out.push(want_a.then(|| saved[3].f_full_like(ga)).transpose()?);
    }
    Ok(out)
}

#[cfg(not(test))]
mod tests {
    pub(super) fn general() -> bool {
        false
    }
    pub(super) fn count() {}
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use tch::nn::ModuleT;
    use tch::{nn, Device, Kind, Tensor};

    use crate::layers::{
        approx_conv2d, approx_linear, ApproxConvConfig, ApproxLinearConfig, InferenceMode, QuantSpec,
    };
    use crate::quantizers::{QuantizerKind, RangeMode};

    thread_local! {
        /// Set: every layer takes the general path.
        static GENERAL: Cell<bool> = const { Cell::new(false) };
        /// Fused nodes built on this thread.
        static FUSED: Cell<usize> = const { Cell::new(0) };
    }

    pub(super) fn general() -> bool {
        GENERAL.with(|g| g.get())
    }

    pub(super) fn count() {
        FUSED.with(|c| c.set(c.get() + 1));
    }

    /// One layer's output and gradients (input, then every variable that learns, by name).
    type Run = (Tensor, Vec<(String, Tensor)>);

    /// What a case changes from a plain training step.
    #[derive(Clone, Copy, Debug)]
    struct Case {
        /// The input needs a gradient.
        x_grad: bool,
        /// Variables whose name ends so are frozen (`""`: none).
        frozen: &'static str,
        /// PACT's alpha is set to this before the steps.
        alpha: Option<f64>,
    }

    /// Builds a layer with `build` (fixed seed), runs two training steps on `x` and
    /// backpropagates `sum(y * weights)` from the second, on the fused path or the general one;
    /// the fused run must build a fused node on each step.
    fn run(build: &dyn Fn(&nn::Path) -> Box<dyn ModuleT>, x: &Tensor, case: Case, general: bool) -> Run {
        GENERAL.with(|g| g.set(general));
        tch::manual_seed(5);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let layer = build(&vs.root());
        if x.kind() == Kind::Double {
            vs.double();
        }
        for (name, v) in vs.variables() {
            if name.ends_with("alpha") {
                if let Some(a) = case.alpha {
                    let _ = tch::no_grad(|| v.shallow_clone().fill_(a));
                }
            }
            if !case.frozen.is_empty() && name.ends_with(case.frozen) {
                let _ = v.set_requires_grad(false);
            }
        }
        let x = x.detach().set_requires_grad(case.x_grad);
        let before = FUSED.with(|c| c.get());
        // Two steps, so that a running range is in use on the second.
        let _ = layer.forward_t(&x, true);
        let y = layer.forward_t(&x, true);
        let built = FUSED.with(|c| c.get()) - before;
        GENERAL.with(|g| g.set(false));
        // Nothing that learns (a frozen weight, no bias, no alpha): no node at all.
        let learns = case.x_grad || vs.variables().values().any(|v| v.requires_grad());
        assert_eq!(built, if general || !learns { 0 } else { 2 }, "{case:?}: fused nodes built");
        if !learns {
            return (y, Vec::new());
        }
        tch::manual_seed(6);
        let weights = y.rand_like() - 0.5;
        (&y * &weights).sum(Kind::Double).backward();
        let mut grads = vec![("input".to_string(), if case.x_grad { x.grad() } else { Tensor::new() })];
        let mut vars: Vec<_> = vs.variables().into_iter().filter(|(_, v)| v.requires_grad()).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        grads.extend(vars.into_iter().map(|(n, v)| (n, v.grad())));
        (y.detach(), grads)
    }

    /// Outputs bit for bit, gradients within float rounding and non-zero, except under a
    /// non-finite alpha, whose own gradient is zero.
    fn assert_same(fused: Run, general: Run, case: &str) {
        assert_eq!(fused.0.size(), general.0.size(), "{case}: output shape");
        let both_nan = fused.0.isnan().logical_and(&general.0.isnan());
        let exact = fused.0.eq_tensor(&general.0).logical_or(&both_nan).all().int64_value(&[]) == 1;
        assert!(exact, "{case}: outputs differ");
        assert_eq!(fused.1.len(), general.1.len(), "{case}: gradients");
        for ((name, a), (_, b)) in fused.1.iter().zip(&general.1) {
            assert_eq!(a.defined(), b.defined(), "{case}: {name} gradient defined");
            if !a.defined() {
                continue;
            }
            let scale = b.abs().max().double_value(&[]).max(1e-3);
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff <= 1e-4 * scale, "{case}: {name} gradient differs by {diff} (scale {scale})");
            // A non-finite alpha clips everything (or nothing survives its tiny scale), so
            // only its own gradient is pinned: zero.
            let largest = b.abs().max().double_value(&[]);
            if !case.contains("alpha: Some(") {
                assert!(largest > 0.0, "{case}: {name} gets no gradient");
            } else if name.ends_with("alpha") {
                assert_eq!(largest, 0.0, "{case}: {name} gradient");
            }
        }
    }

    fn specs() -> Vec<QuantSpec> {
        let base = QuantSpec { mode: InferenceMode::Quantized, init_alpha: 1.1, ..Default::default() };
        vec![
            base,
            QuantSpec { x_kind: QuantizerKind::MinMax, ..base },
            QuantSpec {
                x_kind: QuantizerKind::MinMax,
                x_range: RangeMode::Running { momentum: 0.9 },
                ..base
            },
            QuantSpec { bitwidth: 4, ..base },
        ]
    }

    /// Every input-gradient and frozen-variable combination, and PACT with a non-finite alpha.
    fn cases(spec: &QuantSpec) -> Vec<Case> {
        let mut cases = Vec::new();
        for x_grad in [true, false] {
            for frozen in ["", "weight", "bias", "alpha"] {
                cases.push(Case { x_grad, frozen, alpha: None });
            }
            if spec.x_kind == QuantizerKind::Pact {
                cases.push(Case { x_grad, frozen: "", alpha: Some(f64::NAN) });
                cases.push(Case { x_grad, frozen: "", alpha: Some(f64::INFINITY) });
            }
        }
        cases
    }

    #[test]
    fn fused_linear_equals_the_general_path() {
        for spec in specs() {
            for bias in [true, false] {
                let build = move |p: &nn::Path| -> Box<dyn ModuleT> {
                    Box::new(approx_linear(p / "fc", 7, 5, ApproxLinearConfig { bias, quant: spec }))
                };
                for shape in [&[6i64, 7][..], &[7], &[2, 3, 7]] {
                    for kind in [Kind::Float, Kind::Double] {
                        for case in cases(&spec) {
                            tch::manual_seed(7);
                            let x = Tensor::randn(shape, (kind, Device::Cpu)) * 1.5;
                            let name = format!("{spec:?} bias {bias} {shape:?} {kind:?} {case:?}");
                            assert_same(run(&build, &x, case, false), run(&build, &x, case, true), &name);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fused_convolution_equals_the_general_path() {
        // One channel (the second-channel route to alpha), several, grouped, strided and dilated.
        let geometries = [(1, 1, 1, 2, 1), (3, 1, 1, 1, 1), (4, 2, 2, 1, 2), (2, 1, 2, 0, 1)];
        for spec in specs() {
            for (cin, groups, stride, padding, dilation) in geometries {
                for bias in [true, false] {
                    let cfg = ApproxConvConfig { stride, padding, dilation, groups, bias, quant: spec };
                    let build = move |p: &nn::Path| -> Box<dyn ModuleT> {
                        Box::new(approx_conv2d(p / "conv", cin, 4, 3, cfg))
                    };
                    for (batched, kind) in [(true, Kind::Float), (false, Kind::Float), (true, Kind::Double)] {
                        for case in cases(&spec) {
                            tch::manual_seed(8);
                            let x = Tensor::randn([3, cin, 9, 9], (kind, Device::Cpu)) * 1.5;
                            let x = if batched { x } else { x.get(0) };
                            let name = format!(
                                "{spec:?} conv {cin} {groups} {stride} {padding} {dilation} bias {bias} batched {batched} {kind:?} {case:?}"
                            );
                            assert_same(run(&build, &x, case, false), run(&build, &x, case, true), &name);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_minmax_input_may_change_in_place_after_the_layer() {
        // The general path keeps nothing of a MinMax layer's input; neither does the node.
        let spec = QuantSpec { x_kind: QuantizerKind::MinMax, ..specs()[0] };
        let vs = nn::VarStore::new(Device::Cpu);
        let fc = approx_linear(vs.root() / "fc", 4, 3, ApproxLinearConfig { bias: true, quant: spec });
        let x = Tensor::randn([2, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let h = &x * 2.0;
        let before = FUSED.with(|c| c.get());
        let y = fc.forward_t(&h, true);
        assert_eq!(FUSED.with(|c| c.get()), before + 1, "the fused path was taken");
        let _ = tch::no_grad(|| h.shallow_clone().fill_(0.0));
        y.sum(Kind::Float).backward();
        assert!(fc.weight.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
