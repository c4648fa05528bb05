//! TorchScript source of a rewritten layer's `forward`, computed as the crate's layers compute
//! Quantized mode.

use super::{LayerOp, RewrittenLayer};
use crate::quantizers::{int_max, QuantizerKind, ALPHA_MAX, ALPHA_MIN, MIN_RANGE};

/// A float literal TorchScript parses back to the same double.
fn lit(v: f64) -> String {
    format!("{v:?}")
}

/// The TorchScript `forward` of a rewritten layer. It computes what the crate's
/// `ApproxLinear` / `ApproxConv2d` compute in Quantized mode, op for op: integer inputs and
/// weights with straight-through gradients (`detach`), the float op on them, division by
/// both scales, then the bias.
pub(crate) fn forward_source(l: &RewrittenLayer) -> String {
    let s = l.spec;
    let mut src =
        String::from("def forward(self, input: Tensor) -> Tensor:\n    x = input\n    xd = x.detach()\n");
    // Traced layers without bias have no `bias` attribute at all.
    let bias = if l.bias { "self.bias" } else { "None" };
    let float_op = match l.op {
        LayerOp::Linear => format!("torch.linear(x, self.weight, {bias})"),
        LayerOp::Conv2d { stride, padding, dilation, groups } => format!(
            "torch.conv2d(x, self.weight, {bias}, [{stride}, {stride}], [{padding}, {padding}], [{dilation}, {dilation}], {groups})"
        ),
    };
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
    if s.x_kind == QuantizerKind::Pact {
        src += &format!(
            "    if self.x_quantizer.calibrating:\n\
             \x20       self.x_quantizer.observed = torch.maximum(self.x_quantizer.observed, torch.max(torch.where(torch.isfinite(xd), torch.abs(xd), torch.zeros_like(xd))))\n\
             \x20       return {float_op}\n"
        );
        src += &pact("x_quantizer", "x", "xd", "qx", "sx", im_x);
    } else {
        src += &minmax("x", "xd", "qx", "sx", im_x, false);
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
    src += &match l.op {
        LayerOp::Linear => "    acc = torch.linear(qx, qw, None)\n".to_string(),
        LayerOp::Conv2d { stride, padding, dilation, groups } => format!(
            "    acc = torch.conv2d(qx, qw, None, [{stride}, {stride}], [{padding}, {padding}], [{dilation}, {dilation}], {groups})\n"
        ),
    };
    if s.per_channel {
        src += &format!("    y = acc / (sx * sw.reshape({shape}))\n");
    } else {
        src += "    y = acc / (sx * sw)\n";
    }
    if l.bias {
        src += &format!("    b = self.bias\n    assert b is not None\n    y = y + b.reshape({shape})\n");
    }
    src += "    return y\n";
    src
}
