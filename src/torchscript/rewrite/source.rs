//! TorchScript source of a rewritten layer's `forward`, computed as the crate's layers compute
//! Quantized mode.

use super::{ConvPadding, InputPad, LayerOp, RewrittenLayer};
use crate::layers::QuantSpec;
use crate::quantizers::{int_max, QuantizerKind, RangeMode, ALPHA_MAX, ALPHA_MIN, MIN_RANGE};

/// Whether a layer's input quantizer records input ranges for calibration: PACT (its alpha)
/// and running MinMax (its `running_max`).
pub(crate) fn observes_inputs(s: &QuantSpec) -> bool {
    s.x_kind == QuantizerKind::Pact || matches!(s.x_range, RangeMode::Running { .. })
}

/// A MinMax input quantizer with a running range, as `MinMaxQuant` in `RangeMode::Running`:
/// in training the range becomes `momentum * running + (1 - momentum) * batch` (the first
/// batch sets it) and is stored; in evaluation the stored range is used (the batch's while it
/// is still 0).
fn running_minmax(momentum: f64, im: f64, rounded: bool) -> String {
    let (min, mom, rest) = (lit(MIN_RANGE), lit(momentum), lit(1.0 - momentum));
    format!(
        "    qx_b = torch.max(torch.where(torch.isfinite(xd), torch.abs(xd), torch.zeros_like(xd)))\n\
         \x20   qx_r = self.x_quantizer.running_max.reshape([])\n\
         \x20   if self.training:\n\
         \x20       qx_r = torch.where(qx_r > 0.0, qx_r * {mom} + qx_b * {rest}, qx_b)\n\
         \x20       self.x_quantizer.running_max = qx_r.reshape([1])\n\
         \x20   qx_m = torch.where(qx_r > 0.0, qx_r, qx_b)\n\
         \x20   qx_m = torch.where(qx_m == 0.0, torch.ones_like(qx_m), torch.clamp_min(qx_m, {min}))\n\
         \x20   sx = torch.full_like(qx_m, {im}) / qx_m\n\
         \x20   qx = {round}(torch.clamp(xd, -qx_m, qx_m) * sx)\n\
         \x20   qx = qx + torch.where(torch.isfinite(xd), x - xd, torch.zeros_like(xd)) * sx\n",
        im = lit(im),
        round = if rounded { "torch.round" } else { "" },
    )
}

/// A float literal TorchScript parses back to the same double.
fn lit(v: f64) -> String {
    format!("{v:?}")
}

/// The TorchScript `forward` of a rewritten layer. It computes what the crate's
/// `ApproxLinear` / `ApproxConv2d` compute in Quantized mode, op for op: integer inputs and
/// weights with straight-through gradients (`detach`), the float op on them, division by
/// both scales, then the bias. `optional_bias` reads the bias as `Optional[Tensor]`: for a
/// class whose instances differ in having one (scripted layers keep `bias = None`; traced
/// layers without bias have no `bias` attribute at all, but never share a class).
pub(crate) fn forward_source(l: &RewrittenLayer, optional_bias: bool) -> String {
    let s = l.spec;
    let mut src = String::from("def forward(self, input: Tensor) -> Tensor:\n");
    src += &match l.op {
        LayerOp::Conv2d { input_pad: Some(InputPad { mode, sides: [a, b, c, d] }), .. } => {
            format!("    x = torch.pad(input, [{a}, {b}, {c}, {d}], \"{}\")\n", mode.name())
        }
        _ => "    x = input\n".to_string(),
    };
    src += "    xd = x.detach()\n";
    let bias = if optional_bias || l.bias { "self.bias" } else { "None" };
    let op = |x: &str, w: &str, b: &str| match l.op {
        LayerOp::Linear => format!("torch.linear({x}, {w}, {b})"),
        LayerOp::Conv2d { stride: [s0, s1], padding, dilation: [d0, d1], groups, .. } => {
            let padding = match padding {
                ConvPadding::Zeros([p0, p1]) => format!("[{p0}, {p1}]"),
                ConvPadding::Same => "\"same\"".to_string(),
            };
            format!("torch.conv2d({x}, {w}, {b}, [{s0}, {s1}], {padding}, [{d0}, {d1}], {groups})")
        }
    };
    let float_op = op("x", "self.weight", bias);
    let im_x = int_max(s.x_bitwidth()) as f64;
    let im_w = int_max(s.w_bitwidth()) as f64;
    let (amin, amax) = (lit(ALPHA_MIN), lit(ALPHA_MAX));
    let round = |e: String| if s.rounded { format!("torch.round({e})") } else { e };
    let pact = |q: &str, v: &str, vd: &str, out: &str, scale: &str, im: f64| {
        format!(
            "    {q}_raw = self.{q}.alpha.reshape([])\n\
             \x20   {q}_a = torch.clamp(torch.nan_to_num({q}_raw.detach(), {amin}, {amax}, {amin}), {amin}, {amax})\n\
             \x20   {scale} = torch.full_like({q}_a, {im}) / {q}_a\n\
             \x20   {q}_int = {rounded}\n\
             \x20   {q}_in = torch.abs({vd}) < {q}_a\n\
             \x20   {q}_up = {vd} >= {q}_a\n\
             \x20   {q}_lo = {vd} <= -{q}_a\n\
             \x20   {q}_g = torch.where(torch.isfinite({q}_raw), {q}_raw, torch.zeros_like({q}_raw))\n\
             \x20   {q}_zero = torch.zeros_like({q}_g)\n\
             \x20   {q}_sur = torch.where({q}_in, {v}, torch.zeros_like({v})) + torch.where({q}_up, {q}_g, {q}_zero) - torch.where({q}_lo, {q}_g, {q}_zero)\n\
             \x20   {out} = {q}_int + ({q}_sur - {q}_sur.detach()) * {scale}\n",
            im = lit(im),
            rounded = round(format!("torch.clamp({vd} * {scale}, {}, {})", lit(-im), lit(im))),
        )
    };
    let minmax = |v: &str, vd: &str, out: &str, scale: &str, im: f64, per_channel: bool| {
        let m = format!("{out}_m");
        let absd = format!("torch.where(torch.isfinite({vd}), torch.abs({vd}), torch.zeros_like({vd}))");
        let range = if per_channel {
            format!(
                "    {m} = torch.amax({absd}, {dims}, True)\n\
                 \x20   {m} = torch.where({m} != 0.0, torch.clamp_min({m}, {min}), torch.ones_like({m}))\n",
                min = lit(MIN_RANGE),
                dims = if l.op == LayerOp::Linear { "[1]" } else { "[1, 2, 3]" }
            )
        } else {
            format!(
                "    {m} = torch.max({absd})\n\
                 \x20   {m} = torch.where({m} == 0.0, torch.ones_like({m}), torch.clamp_min({m}, {min}))\n",
                min = lit(MIN_RANGE)
            )
        };
        format!(
            "{range}\
             \x20   {scale} = torch.full_like({m}, {im}) / {m}\n\
             \x20   {out} = {rounded}\n\
             \x20   {out} = {out} + torch.where(torch.isfinite({vd}), {v} - {vd}, torch.zeros_like({vd})) * {scale}\n",
            im = lit(im),
            rounded = round(format!("torch.clamp({vd}, -{m}, {m}) * {scale}")),
        )
    };
    if observes_inputs(&s) {
        src += &format!(
            "    if self.x_quantizer.calibrating:\n\
             \x20       self.x_quantizer.observed = torch.maximum(self.x_quantizer.observed, torch.max(torch.where(torch.isfinite(xd), torch.abs(xd), torch.zeros_like(xd))))\n\
             \x20       return {float_op}\n"
        );
    }
    match (s.x_kind, s.x_range) {
        (QuantizerKind::Pact, _) => src += &pact("x_quantizer", "x", "xd", "qx", "sx", im_x),
        (_, RangeMode::Running { momentum }) => src += &running_minmax(momentum, im_x, s.rounded),
        _ => src += &minmax("x", "xd", "qx", "sx", im_x, false),
    }
    src += "    w = self.weight\n    wd = w.detach()\n";
    if s.w_kind == QuantizerKind::Pact {
        src += &pact("w_quantizer", "w", "wd", "qw", "sw", im_w);
    } else {
        src += &minmax("w", "wd", "qw", "sw", im_w, s.per_channel);
    }
    let shape = match l.op {
        LayerOp::Linear => "[-1]",
        LayerOp::Conv2d { .. } => "[-1, 1, 1]",
    };
    src += &format!("    acc = {}\n", op("qx", "qw", "None"));
    if s.per_channel {
        src += &format!("    y = acc / (sx * sw.reshape({shape}))\n");
    } else {
        src += "    y = acc / (sx * sw)\n";
    }
    if optional_bias {
        src += &format!("    b = self.bias\n    if b is not None:\n        y = y + b.reshape({shape})\n");
    } else if l.bias {
        src += &format!("    b = self.bias\n    assert b is not None\n    y = y + b.reshape({shape})\n");
    }
    src += "    return y\n";
    src
}
