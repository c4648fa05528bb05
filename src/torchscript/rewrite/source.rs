//! TorchScript source of a rewritten layer's `forward`, computed as the crate's layers compute
//! Quantized mode: the training path with straight-through gradients, and a no-grad path
//! with fewer passes and MinMax weights quantized once per weight update.

use super::{ConvPadding, InputPad, LayerOp, RewrittenLayer};
use crate::layers::QuantSpec;
use crate::quantizers::{int_max, QuantizerKind, RangeMode, ALPHA_MAX, ALPHA_MIN, MIN_RANGE};

/// The layer attributes of the weight cache of the no-grad path: the quantized weight, its
/// scale, and the weight tensor and version counter they were computed from. Plain attributes,
/// neither parameters nor buffers, so `state_dict` never lists them.
pub(crate) const WEIGHT_CACHE: [&str; 4] = ["w_cache", "w_cache_scale", "w_cache_weight", "w_cache_version"];

/// Whether a layer's input quantizer records input ranges for calibration: PACT (its alpha)
/// and running MinMax (its `running_max`).
pub(crate) fn observes_inputs(s: &QuantSpec) -> bool {
    s.x_kind == QuantizerKind::Pact || matches!(s.x_range, RangeMode::Running { .. })
}

/// The paths, from the layer, of its input quantizers that observe inputs for calibration.
pub(crate) fn observing_quantizers(l: &RewrittenLayer) -> Vec<&'static str> {
    match (observes_inputs(&l.spec), l.op) {
        (false, _) => Vec::new(),
        (true, LayerOp::Attention { .. }) => vec!["x_quantizer", "out_proj.x_quantizer"],
        (true, _) => vec!["x_quantizer"],
    }
}

/// Whether the layer keeps the weight cache: MinMax weights depend on nothing but the weight.
pub(crate) fn caches_weight(s: &QuantSpec) -> bool {
    s.w_kind == QuantizerKind::MinMax
}

/// A float literal TorchScript parses back to the same double.
fn lit(v: f64) -> String {
    format!("{v:?}")
}

/// `lines` (each ending in a newline) indented by `by` spaces.
pub(super) fn indent(lines: &str, by: usize) -> String {
    lines.lines().map(|l| format!("{:by$}{l}\n", "")).collect()
}

/// `if cond:` with `then` and `otherwise` (blocks at indentation 0) under it.
fn branch(cond: &str, then: &str, otherwise: &str) -> String {
    format!("if {cond}:\n{}else:\n{}", indent(then, 4), indent(otherwise, 4))
}

/// Rounds `e` to integers when the spec rounds.
fn rounded(s: &QuantSpec, e: String) -> String {
    if s.rounded {
        format!("torch.round({e})")
    } else {
        e
    }
}

/// Rounds the fresh temporary `e` in place when the spec rounds: without gradients nothing
/// else holds it, and large fresh allocations cost as much as the pass itself.
fn rounded_in_place(s: &QuantSpec, e: String) -> String {
    if s.rounded {
        format!("{e}.round_()")
    } else {
        e
    }
}

/// The TorchScript variable names of one quantized operand.
struct Operand {
    /// The float value.
    v: &'static str,
    /// It, detached.
    vd: &'static str,
    /// The quantized integers (as floats).
    out: &'static str,
    /// The scale: `out = v * scale`, rounded and clipped.
    scale: &'static str,
}

const X: Operand = Operand { v: "x", vd: "xd", out: "qx", scale: "sx" };
const W: Operand = Operand { v: "w", vd: "wd", out: "qw", scale: "sw" };

/// `{ok}`: whether every value of `vd` is finite, in one reduction pass (`aminmax`, which
/// propagates NaN, is much faster than `abs().max()` or an infinity norm).
fn all_finite(vd: &str, ok: &str) -> String {
    format!("{ok}_lo, {ok}_hi = torch.aminmax({vd})\n{ok} = bool(torch.isfinite({ok}_lo) & torch.isfinite({ok}_hi))\n")
}

/// The straight-through output: the value `{out}` (integers), the gradient of `{t}`. Exact:
/// `|out - t| <= 1/2` makes `out - t` exact (Sterbenz), so `t + (out - t)` is `out` again.
fn straight_through(out: &str, t: &str) -> String {
    format!("{out} = {t} + ({out} - {t}.detach())\n")
}

/// PACT quantization of an operand by the alpha of submodule `q`; with `grad`, PACT's
/// straight-through gradient: to the operand where `|v| < alpha`, to alpha (+1 above it,
/// -1 below minus it), both times the scale.
fn pact(s: &QuantSpec, q: &str, o: &Operand, im: f64, grad: bool) -> String {
    let Operand { v, vd, out, scale } = o;
    let (amin, amax, im) = (lit(ALPHA_MIN), lit(ALPHA_MAX), lit(im));
    let mut src = format!(
        "{q}_raw = self.{q}.alpha.reshape([])\n\
         {q}_a = torch.clamp(torch.nan_to_num({q}_raw.detach(), {amin}, {amax}, {amin}), {amin}, {amax})\n\
         {scale} = torch.full_like({q}_a, {im}) / {q}_a\n"
    );
    if !grad {
        let int = rounded_in_place(s, format!("torch.mul({vd}, {scale}).clamp_(-{im}, {im})"));
        return src + &format!("{out} = {int}\n");
    }
    src += &format!("{out} = {}\n", rounded(s, format!("torch.clamp({vd} * {scale}, -{im}, {im})")));
    src += &format!("{q}_g = torch.where(torch.isfinite({q}_raw), {q}_raw, torch.zeros_like({q}_raw))\n");
    src += &all_finite(vd, &format!("{q}_ok"));
    // Finite values take the short form; NaN or ±inf ones the long form that keeps them out
    // of every gradient.
    let short = format!(
        "{q}_sur = torch.where({vd} >= {q}_a, {q}_g, torch.where({vd} <= -{q}_a, -{q}_g, {v}))\n\
         {q}_t = {q}_sur * {scale}\n{}",
        straight_through(out, &format!("{q}_t"))
    );
    let long = format!(
        "{q}_in = torch.abs({vd}) < {q}_a\n\
         {q}_up = {vd} >= {q}_a\n\
         {q}_lo = {vd} <= -{q}_a\n\
         {q}_zero = torch.zeros_like({q}_g)\n\
         {q}_sur = torch.where({q}_in, {v}, torch.zeros_like({v})) + torch.where({q}_up, {q}_g, {q}_zero) - torch.where({q}_lo, {q}_g, {q}_zero)\n\
         {out} = {out} + ({q}_sur - {q}_sur.detach()) * {scale}\n"
    );
    src + &branch(&format!("{q}_ok"), &short, &long)
}

/// The largest finite `|vd|`, per output channel (`per_channel`: the shape of the channels'
/// ranges) or of the whole tensor, into `{m}`, and `{m}_ok`, whether every value is finite:
/// one `aminmax` pass when they are.
fn abs_max(vd: &str, m: &str, per_channel: Option<&str>) -> String {
    let absd = format!("torch.where(torch.isfinite({vd}), torch.abs({vd}), torch.zeros_like({vd}))");
    let (fast, slow) = match per_channel {
        Some(shape) => (
            format!(
                "{m}_lo, {m}_hi = torch.aminmax({vd}.reshape([{vd}.size(0), -1]), dim=1, keepdim=True)\n\
                 {m} = torch.maximum(-{m}_lo, {m}_hi).reshape({shape})\n"
            ),
            format!("torch.amax({absd}.reshape([{vd}.size(0), -1]), [1], True).reshape({shape})"),
        ),
        None => (
            format!("{m}_lo, {m}_hi = torch.aminmax({vd})\n{m} = torch.maximum(-{m}_lo, {m}_hi)\n"),
            format!("torch.max({absd})"),
        ),
    };
    format!("{fast}{m}_ok = bool(torch.isfinite({m}).all())\nif not {m}_ok:\n    {m} = {slow}\n")
}

/// [`abs_max`] made a usable range as `MinMaxQuant` makes it: 0 becomes 1, tiny ranges `MIN_RANGE`.
fn minmax_range(vd: &str, m: &str, dims: Option<&str>) -> String {
    abs_max(vd, m, dims) + &effective_range(m)
}

fn effective_range(m: &str) -> String {
    format!("{m} = torch.where({m} == 0.0, torch.ones_like({m}), torch.clamp_min({m}, {}))\n", lit(MIN_RANGE))
}

/// MinMax quantization of an operand within the range `m`; with `grad`, the straight-through
/// gradient to it (kept out where it is not finite). `ok` names a bool that holds when every
/// value is finite; `covers` says the range is at least the largest of them (its own range,
/// not a running one), so that clipping can be skipped.
fn minmax_quant(s: &QuantSpec, o: &Operand, m: &str, im: f64, grad: bool, ok: &str, covers: bool) -> String {
    let Operand { v, vd, out, scale } = o;
    let clipped = if grad {
        rounded(s, format!("torch.clamp({vd}, -{m}, {m}) * {scale}"))
    } else {
        rounded_in_place(s, format!("torch.clamp({vd}, -{m}, {m}).mul_({scale})"))
    };
    let mut src = format!("{scale} = torch.full_like({m}, {im}) / {m}\n", im = lit(im));
    let mut short = match (covers, grad) {
        (true, true) => format!("{out} = {}\n", rounded(s, format!("{vd} * {scale}"))),
        (true, false) => format!("{out} = {}\n", rounded_in_place(s, format!("torch.mul({vd}, {scale})"))),
        (false, _) => format!("{out} = {clipped}\n"),
    };
    let mut long = format!("{out} = {clipped}\n");
    if !grad && !covers {
        return src + &long;
    }
    if grad {
        short += &format!("{out}_t = {v} * {scale}\n{}", straight_through(out, &format!("{out}_t")));
        long += &format!(
            "{out} = {out} + torch.where(torch.isfinite({vd}), {v} - {vd}, torch.zeros_like({vd})) * {scale}\n"
        );
    }
    src += &branch(ok, &short, &long);
    src
}

/// `native` (a call of the crate's operators, `torchapprox.pact_scaled`,
/// `torchapprox.minmax_scaled` or `torchapprox.minmax_weight`) where the operand `v` is
/// float32 or float64 and the crate runs the model, `portable` (builtin TorchScript with the
/// same values) otherwise.
fn native_or(v: &str, native: Option<String>, portable: String) -> String {
    match native {
        // Dtypes are ints in TorchScript (ScalarType: 6 float32, 7 float64); `torch.float32`
        // cannot be resolved in source defined on a module.
        Some(call) => branch(&format!("{v}.dtype == 6 or {v}.dtype == 7"), &call, &portable),
        None => portable,
    }
}

/// TorchScript's spelling of a bool.
fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// The call of the crate's PACT operator: `{out}, {scale}` from operand `o` and the alpha of `q`.
fn native_pact(s: &QuantSpec, q: &str, o: &Operand, im: f64) -> String {
    let Operand { v, out, scale, .. } = o;
    format!(
        "{out}, {scale} = torchapprox.pact_scaled({v}, self.{q}.alpha, {}, {})\n",
        im as i64,
        py_bool(s.rounded)
    )
}

/// The call of the crate's MinMax operator (the operand's own range, per channel or not);
/// with `buffer`, `minmax_weight`, which may write the integers into that attribute.
fn native_minmax(s: &QuantSpec, o: &Operand, im: f64, per_channel: bool, buffer: Option<&str>) -> String {
    let Operand { v, out, scale, .. } = o;
    let (op, buffer) = match buffer {
        Some(b) => ("minmax_weight", format!("self.{b}, ")),
        None => ("minmax_scaled", String::new()),
    };
    format!(
        "{out}, {scale} = torchapprox.{op}({v}, {buffer}{}, {}, {})\n",
        im as i64,
        py_bool(s.rounded),
        py_bool(per_channel)
    )
}

/// A PACT quantizer (submodule `q`) of operand `o`, with and without gradients, or the
/// crate's operator where `native` and the dtype allow.
fn pact_quantizer(s: &QuantSpec, q: &str, o: &Operand, im: f64, native: bool) -> String {
    native_or(
        o.v,
        native.then(|| native_pact(s, q, o, im)),
        branch("torch.is_grad_enabled()", &pact(s, q, o, im, true), &pact(s, q, o, im, false)),
    )
}

/// The input quantizer: `qx` and `sx` from `x` (`xd` detached); `native` calls the crate's
/// operators where they apply (the in-memory form; saved files carry the builtin one).
pub(super) fn input_quantizer(s: &QuantSpec, im: f64, native: bool) -> String {
    match (s.x_kind, s.x_range) {
        (QuantizerKind::Pact, _) => pact_quantizer(s, "x_quantizer", &X, im, native),
        // As `MinMaxQuant` in `RangeMode::Running`: in training the range becomes
        // `momentum * running + (1 - momentum) * batch` (the first batch sets it) and is
        // stored; in evaluation the stored range is used (the batch's while it is still 0).
        (_, RangeMode::Running { momentum }) => {
            let update = format!(
                "qx_r = torch.where(qx_r > 0.0, qx_r * {} + qx_b * {}, qx_b)\n\
                 self.x_quantizer.running_max = qx_r.reshape([1])\n",
                lit(momentum),
                lit(1.0 - momentum)
            );
            let quant = |grad| minmax_quant(s, &X, "qx_m", im, grad, "qx_ok", false);
            format!(
                "qx_r = self.x_quantizer.running_max.reshape([])\n\
                 if self.training or not bool(qx_r > 0.0):\n{}\
                 qx_m = qx_r\n{}{}",
                indent(
                    &(abs_max("xd", "qx_b", None) + &branch("self.training", &update, "qx_r = qx_b\n")),
                    4
                ),
                effective_range("qx_m"),
                branch("torch.is_grad_enabled()", &(all_finite("xd", "qx_ok") + &quant(true)), &quant(false)),
            )
        }
        _ => {
            let quant = |grad| minmax_quant(s, &X, "qx_m", im, grad, "qx_m_ok", true);
            native_or(
                "x",
                native.then(|| native_minmax(s, &X, im, false, None)),
                minmax_range("xd", "qx_m", None)
                    + &branch("torch.is_grad_enabled()", &quant(true), &quant(false)),
            )
        }
    }
}

/// The weight quantizer: `qw` and `sw` from `w`. Without gradients a MinMax weight is
/// quantized once per weight update: the cache is keyed on the weight tensor itself, its
/// version counter (every in-place update, such as an optimizer step or `load_state_dict`,
/// bumps it), dtype and device. The crate's operator (`native`) writes the integers into the
/// cache's memory where nothing else shares it, with gradients too (a training step then
/// allocates no weight-sized tensor for them), and leaves the cache valid for that weight.
pub(super) fn weight_quantizer(s: &QuantSpec, op: LayerOp, im: f64, native: bool) -> String {
    if s.w_kind == QuantizerKind::Pact {
        return pact_quantizer(s, "w_quantizer", &W, im, native);
    }
    let dims = s.per_channel.then_some(if op == LayerOp::Linear { "[-1, 1]" } else { "[-1, 1, 1, 1]" });
    // (An attention's projections pass LayerOp::Linear: their weights are matrices.)
    let [cache, scale, weight, version] = WEIGHT_CACHE;
    let keep = format!(
        "self.{cache} = qw.detach()\nself.{scale} = sw\nself.{weight} = w\nself.{version} = w._version()\n"
    );
    let call = native_minmax(s, &W, im, s.per_channel, Some(cache));
    let fresh = |grad: bool| {
        native_or(
            "w",
            native.then(|| if grad { call.clone() + &keep } else { call.clone() }),
            minmax_range("wd", "qw_m", dims) + &minmax_quant(s, &W, "qw_m", im, grad, "qw_m_ok", true),
        )
    };
    let refresh = fresh(false) + &keep;
    let stale = format!(
        "self.{version} != w._version() or not (self.{weight} is w) or self.{cache}.dtype != w.dtype or self.{cache}.device != w.device"
    );
    let cached = format!("if {stale}:\n{}qw = self.{cache}\nsw = self.{scale}\n", indent(&refresh, 4));
    branch("torch.is_grad_enabled()", &fresh(true), &cached)
}

/// The layer attribute naming the multiplier of approximate mode (an id of `glue::ops`, -1
/// for exact products).
pub(crate) const APPROX_MULTIPLIER: &str = "approx_multiplier";

/// `acc`, the layer's integer sums: the exact op `exact`, or in approximate mode the table
/// products of the crate's operators (with the exact products' gradient, as the crate's
/// layers: `acc + (lut - acc)`, the difference detached).
pub(super) fn accumulate(op: LayerOp, exact: &str, portable: bool) -> String {
    let id = format!("self.{APPROX_MULTIPLIER}");
    let (prep, lut) = match op {
        LayerOp::Linear | LayerOp::Attention { .. } if portable => (String::new(), gather_linear()),
        LayerOp::Linear | LayerOp::Attention { .. } => {
            (String::new(), format!("torchapprox.lut_linear(qx_l, qw_l, {id})"))
        }
        LayerOp::Conv2d { kernel, stride: [s0, s1], padding, dilation, groups, .. } => {
            let (pad, [p0, p1]) = match padding {
                ConvPadding::Zeros(p) => (None, p),
                ConvPadding::Same => {
                    // PyTorch's 'same': d * (k - 1) in all, the odd one on the bottom/right.
                    let total = [0, 1].map(|i| dilation[i] * (kernel[i] - 1));
                    if total.iter().all(|t| t % 2 == 0) {
                        (None, total.map(|t| t / 2))
                    } else {
                        let [t0, t1] = total;
                        (Some([t1 / 2, t1 - t1 / 2, t0 / 2, t0 - t0 / 2]), [0, 0])
                    }
                }
            };
            let prep = match pad {
                Some([a, b, c, d]) => {
                    format!("qx_l = torch.constant_pad_nd(qx_l, [{a}, {b}, {c}, {d}], 0.0)\n")
                }
                None => String::new(),
            };
            let [d0, d1] = dilation;
            if portable {
                (prep, gather_conv2d(kernel, [s0, s1], [p0, p1], dilation, groups))
            } else {
                (prep, format!("torchapprox.lut_conv2d(qx_l, qw_l, {id}, [{s0}, {s1}], [{p0}, {p1}], [{d0}, {d1}], {groups})"))
            }
        }
    };
    // The portable form computes `lut` in statements; the operator in one expression.
    let (body, lut) = if portable { (lut, "lut".to_string()) } else { (String::new(), lut) };
    let table = |detach: &str| format!("qx_l = qx{detach}\nqw_l = qw{detach}\n{prep}{body}");
    let with_grad =
        format!("acc = {exact}\n{}lut = {lut}\nacc = acc + (lut - acc.detach())\n", table(".detach()"));
    format!(
        "if {id} < 0:\n    acc = {exact}\n{}",
        branch("torch.is_grad_enabled()", &with_grad, &format!("{}acc = {lut}\n", table("")))
            .replacen("if ", "elif ", 1)
    )
}

/// The layer attribute holding, in a saved file, the multiplier's table as int64
/// `table[(a + 128) * 256 + (b + 128)]` (empty without a multiplier).
pub(crate) const APPROX_TABLE: &str = "approx_table";

/// Statements setting `lut`, the table products of `qx_l` `[*, K]` and `qw_l` `[O, K]`, in
/// plain TorchScript (one gather per output feature, summed exactly in int64).
fn gather_linear() -> String {
    format!(
        "t = self.{APPROX_TABLE}\n\
         xi = (qx_l + 128.0).long() * 256\n\
         wi = (qw_l + 128.0).long()\n\
         cols: List[Tensor] = []\n\
         for o in range(wi.size(0)):\n\
         \x20   cols.append(t[xi + wi[o]].sum(-1))\n\
         lut = torch.stack(cols, -1).to(qx_l.dtype)\n"
    )
}

/// Statements setting `lut`, the table products of a convolution of `qx_l` and `qw_l`, in
/// plain TorchScript: the input unfolded (`im2col`, zeros for padding, which multiply through
/// the table as in the crate's kernel), one gather per output channel, summed in int64.
fn gather_conv2d(
    kernel: [i64; 2],
    stride: [i64; 2],
    padding: [i64; 2],
    dilation: [i64; 2],
    groups: i64,
) -> String {
    let ([kh, kw], [s0, s1], [p0, p1], [d0, d1]) = (kernel, stride, padding, dilation);
    format!(
        "t = self.{APPROX_TABLE}\n\
         n = qx_l.size(0)\n\
         ho = (qx_l.size(2) + {py2} - {ey} - 1) // {s0} + 1\n\
         wo = (qx_l.size(3) + {px2} - {ex} - 1) // {s1} + 1\n\
         xi = (torch.im2col(qx_l, [{kh}, {kw}], [{d0}, {d1}], [{p0}, {p1}], [{s0}, {s1}]) + 128.0).long() * 256\n\
         wi = (qw_l.reshape([qw_l.size(0), -1]) + 128.0).long()\n\
         kg = wi.size(1)\n\
         og = wi.size(0) // {groups}\n\
         chans: List[Tensor] = []\n\
         for o in range(wi.size(0)):\n\
         \x20   xg = xi.narrow(1, (o // og) * kg, kg)\n\
         \x20   chans.append(t[xg + wi[o].reshape([1, kg, 1])].sum(1))\n\
         lut = torch.stack(chans, 1).to(qx_l.dtype).reshape([n, wi.size(0), ho, wo])\n",
        py2 = 2 * p0,
        px2 = 2 * p1,
        ey = d0 * (kh - 1),
        ex = d1 * (kw - 1),
    )
}

/// The TorchScript `forward` of a rewritten layer; `portable` gives the form saved files carry,
/// which plain PyTorch runs (approximate products by gathers from `approx_table` instead of
/// the crate's operators). It computes what the crate's
/// `ApproxLinear` / `ApproxConv2d` compute in Quantized mode, op for op: integer inputs and
/// weights with straight-through gradients (`detach`), the float op on them, division by
/// both scales, then the bias; without gradients the same values with fewer passes.
/// `optional_bias` reads the bias as `Optional[Tensor]`: for a class whose instances differ
/// in having one (scripted layers keep `bias = None`; traced layers without bias have no
/// `bias` attribute at all, but never share a class).
pub(crate) fn forward_source(l: &RewrittenLayer, optional_bias: bool, portable: bool) -> String {
    let s = l.spec;
    if let LayerOp::Attention { batch_first, traced, separate } = l.op {
        return super::attention::attention_source(&s, batch_first, traced, separate, l.bias, !portable);
    }
    let mut body = match l.op {
        LayerOp::Conv2d { input_pad: Some(InputPad { mode, sides: [a, b, c, d] }), .. } => {
            format!("x = torch.pad(input, [{a}, {b}, {c}, {d}], \"{}\")\n", mode.name())
        }
        _ => "x = input\n".to_string(),
    };
    body += "xd = x.detach()\n";
    let bias = if optional_bias || l.bias { "self.bias" } else { "None" };
    let op = |x: &str, w: &str, b: &str| match l.op {
        LayerOp::Linear | LayerOp::Attention { .. } => format!("torch.linear({x}, {w}, {b})"),
        LayerOp::Conv2d { stride: [s0, s1], padding, dilation: [d0, d1], groups, .. } => {
            let padding = match padding {
                ConvPadding::Zeros([p0, p1]) => format!("[{p0}, {p1}]"),
                ConvPadding::Same => "\"same\"".to_string(),
            };
            format!("torch.conv2d({x}, {w}, {b}, [{s0}, {s1}], {padding}, [{d0}, {d1}], {groups})")
        }
    };
    if observes_inputs(&s) {
        body += &format!(
            "if self.x_quantizer.calibrating:\n\
             \x20   self.x_quantizer.observed = torch.maximum(self.x_quantizer.observed, torch.max(torch.where(torch.isfinite(xd), torch.abs(xd), torch.zeros_like(xd))))\n\
             \x20   return {}\n",
            op("x", "self.weight", bias)
        );
    }
    body += &input_quantizer(&s, int_max(s.x_bitwidth()) as f64, !portable);
    body += "w = self.weight\nwd = w.detach()\n";
    body += &weight_quantizer(&s, l.op, int_max(s.w_bitwidth()) as f64, !portable);
    let shape = match l.op {
        LayerOp::Linear | LayerOp::Attention { .. } => "[-1]",
        LayerOp::Conv2d { .. } => "[-1, 1, 1]",
    };
    body += &accumulate(l.op, &op("qx", "qw", "None"), portable);
    let scales = if s.per_channel { format!("sx * sw.reshape({shape})") } else { "sx * sw".to_string() };
    // Without gradients the accumulator is a temporary of no one else: divided and biased in place.
    let out = |grad: bool| {
        let (div, add) = if grad { ("y = acc / ", "y = y + ") } else { ("y = acc.div_", "y = y.add_") };
        let wrap = |e: &str| format!("({e})");
        let mut src = format!("{div}{}\n", wrap(&scales));
        if optional_bias {
            src += &format!(
                "b = self.bias\nif b is not None:\n    {add}{}\n",
                wrap(&format!("b.reshape({shape})"))
            );
        } else if l.bias {
            src += &format!(
                "b = self.bias\nassert b is not None\n{add}{}\n",
                wrap(&format!("b.reshape({shape})"))
            );
        }
        src
    };
    body += &branch("torch.is_grad_enabled()", &out(true), &out(false));
    body += "return y\n";
    format!("def forward(self, input: Tensor) -> Tensor:\n{}", indent(&body, 4))
}
