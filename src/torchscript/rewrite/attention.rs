//! TorchScript source of a rewritten `nn.MultiheadAttention`: the input projections (packed
//! `in_proj_weight`, or separate `q/k/v_proj_weight`) and the output projection (`out_proj`)
//! quantized as the rewrite's Linear layers quantize, the attention between them in float as
//! PyTorch computes it (scaled dot products, masks, dropout, weights).

use super::source::{accumulate, indent, input_quantizer, observes_inputs, weight_quantizer};
use super::{LayerOp, TracedAttention};
use crate::layers::QuantSpec;
use crate::quantizers::int_max;

/// The forward's schema: exactly the scripted `nn.MultiheadAttention.forward`'s, so that
/// its callers' compiled calls still fit.
const SCHEMA: &str = "def forward(self, query: Tensor, key: Tensor, value: Tensor, \
    key_padding_mask: Optional[Tensor]=None, need_weights: bool=True, attn_mask: Optional[Tensor]=None, \
    average_attn_weights: bool=True, is_causal: bool=False) -> Tuple[Tensor, Optional[Tensor]]:\n";

fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// A method `name(self, input)` returning one input quantizer's `(qx, sx)`; `q` is the
/// quantizer submodule's path from the attention (`x_quantizer`, `out_proj.x_quantizer`).
fn input_method(s: &QuantSpec, name: &str, q: &str, native: bool) -> String {
    let mut body = String::from("x = input\nxd = x.detach()\n");
    if observes_inputs(s) {
        // Calibration observes the input and lets it through, in float.
        body += "if self.x_quantizer.calibrating:\n\
                 \x20   self.x_quantizer.observed = torch.maximum(self.x_quantizer.observed, torch.max(torch.where(torch.isfinite(xd), torch.abs(xd), torch.zeros_like(xd))))\n\
                 \x20   return x, torch.ones([], dtype=x.dtype, device=x.device)\n";
    }
    body += &input_quantizer(s, int_max(s.x_bitwidth()) as f64, native);
    body += "return qx, sx\n";
    let body = body.replace("self.x_quantizer", &format!("self.{q}"));
    format!("def {name}(self, input: Tensor) -> Tuple[Tensor, Tensor]:\n{}", indent(&body, 4))
}

/// A method `name(self)` returning a weight's `(qw, sw)`; `weight` is its path, `prefix`
/// what precedes its PACT quantizer's name `w_quantizer` (``, `k_`, `v_` on the attention,
/// `out_proj.` on its output projection), `cache` the prefix of its cache attributes.
fn weight_method(s: &QuantSpec, name: &str, weight: &str, prefix: &str, cache: &str, native: bool) -> String {
    let mut body = format!("w = self.{weight}\nwd = w.detach()\n");
    if observes_inputs(s) {
        body += "if self.x_quantizer.calibrating:\n    return w, torch.ones([], dtype=w.dtype, device=w.device)\n";
    }
    body += &weight_quantizer(s, LayerOp::Linear, int_max(s.w_bitwidth()) as f64, native);
    body += "return qw, sw\n";
    let body = body
        .replace("self.w_quantizer", &format!("self.{prefix}w_quantizer"))
        .replace("self.w_cache", &format!("self.{cache}w_cache"));
    format!("def {name}(self) -> Tuple[Tensor, Tensor]:\n{}", indent(&body, 4))
}

/// The methods and `forward` of a rewritten attention whose quantizers follow `s`
/// (`native`: calling the crate's quantizer operators, the in-memory form).
/// A traced attention (`traced`) takes the inputs its trace took and returns what its trace
/// returned; its head count is a constant, its dropout none, and its biases are there when
/// `bias` says so.
/// With `separate` q/k/v weights, each is quantized on its own (`k_w_quantizer`,
/// `v_w_quantizer` for PACT) and projected whole; the packed bias still holds all three.
pub(crate) fn attention_source(
    s: &QuantSpec,
    batch_first: bool,
    traced: Option<TracedAttention>,
    separate: bool,
    bias: bool,
    native: bool,
) -> String {
    // Per-channel scales are rows of their own, but calibration's pass-through scale is one.
    let scales = if s.per_channel {
        "(sw.narrow(0, start, size).reshape([-1]) if sw.dim() > 0 else sw)"
    } else {
        "sw"
    };
    // The projection's integer sums as a Linear layer's: exact, or through the attention's
    // multiplier (its `approx_multiplier`, its `approx_table` in saved files).
    let op = LayerOp::Attention { batch_first, traced, separate };
    let sums = accumulate(op, "torch.linear(qx, qw, None)", !native);
    // Rows `start..start + size` of the (packed) weight, and of the bias from `b_start`.
    let project = format!(
        "def _ta_project(self, qx: Tensor, sx: Tensor, qw_all: Tensor, sw: Tensor, b: Optional[Tensor], start: int, size: int, b_start: int) -> Tensor:\n\
         \x20   qw = qw_all.narrow(0, start, size)\n\
         {}\
         \x20   y = acc / (sx * {scales})\n\
         \x20   if b is not None:\n\
         \x20       y = y + b.narrow(0, b_start, size)\n\
         \x20   return y\n",
        indent(&sums, 4)
    );
    // `batch_first` is a constant of the scripted class, which new methods cannot read.
    let forward = "assert query.dim() == 3, \"a quantized MultiheadAttention takes batched inputs\"\n\
        if BATCH_FIRST:\n\
        \x20   same_key = key is query\n\
        \x20   same_value = value is key\n\
        \x20   query = query.transpose(1, 0)\n\
        \x20   key = query if same_key else key.transpose(1, 0)\n\
        \x20   value = key if same_value else value.transpose(1, 0)\n\
        tgt_len = query.size(0)\n\
        bsz = query.size(1)\n\
        embed = query.size(2)\n\
        src_len = key.size(0)\n\
        heads = self.num_heads\n\
        head_dim = embed // heads\n\
        b = self.in_proj_bias\n\
        xq, sq = self._ta_x_in(query)\n\
        xk, sk = xq, sq\n\
        if not (key is query):\n\
        \x20   xk, sk = self._ta_x_in(key)\n\
        xv, sv = xk, sk\n\
        if not (value is key):\n\
        \x20   xv, sv = self._ta_x_in(value)\n\
        PROJECTIONS\
        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)\n\
        k = k.view(src_len, bsz * heads, head_dim).transpose(0, 1)\n\
        v = v.view(src_len, bsz * heads, head_dim).transpose(0, 1)\n\
        causal = is_causal and key_padding_mask is None and not need_weights\n\
        mask: Optional[Tensor] = None\n\
        if attn_mask is not None and not causal:\n\
        \x20   m = attn_mask\n\
        \x20   if not m.is_floating_point():\n\
        \x20       m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(m, float(\"-inf\"))\n\
        \x20   if m.dim() == 2:\n\
        \x20       m = m.unsqueeze(0)\n\
        \x20   mask = m\n\
        if key_padding_mask is not None:\n\
        \x20   kp = key_padding_mask\n\
        \x20   if not kp.is_floating_point():\n\
        \x20       kp = torch.zeros(kp.shape, dtype=q.dtype, device=q.device).masked_fill(kp, float(\"-inf\"))\n\
        \x20   kp = kp.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)\n\
        \x20   if mask is None:\n\
        \x20       mask = kp\n\
        \x20   else:\n\
        \x20       mask = mask + kp\n\
        p = self.dropout if self.training else 0.0\n\
        weights: Optional[Tensor] = None\n\
        if need_weights:\n\
        \x20   qs = q * ((1.0 / float(head_dim)) ** 0.5)\n\
        \x20   if mask is not None:\n\
        \x20       w_ = torch.baddbmm(mask, qs, k.transpose(-2, -1))\n\
        \x20   else:\n\
        \x20       w_ = torch.bmm(qs, k.transpose(-2, -1))\n\
        \x20   w_ = torch.softmax(w_, -1)\n\
        \x20   if p > 0.0:\n\
        \x20       w_ = torch.dropout(w_, p, True)\n\
        \x20   attn = torch.bmm(w_, v).transpose(0, 1).contiguous().view(tgt_len * bsz, embed)\n\
        \x20   w4 = w_.view(bsz, heads, tgt_len, src_len)\n\
        \x20   weights = w4.mean(1) if average_attn_weights else w4\n\
        else:\n\
        \x20   if mask is not None:\n\
        \x20       if mask.size(0) == 1 and mask.dim() == 3:\n\
        \x20           mask = mask.unsqueeze(0)\n\
        \x20       else:\n\
        \x20           mask = mask.view(bsz, heads, -1, src_len)\n\
        \x20   q4 = q.view(bsz, heads, tgt_len, head_dim)\n\
        \x20   k4 = k.view(bsz, heads, src_len, head_dim)\n\
        \x20   v4 = v.view(bsz, heads, src_len, head_dim)\n\
        \x20   attn = torch.scaled_dot_product_attention(q4, k4, v4, mask, p, causal)\n\
        \x20   attn = attn.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed)\n\
        xo, so = self._ta_x_out(attn)\n\
        wo, swo = self._ta_w_out()\n\
        out = self._ta_project(xo, so, wo, swo, self.out_proj.bias, 0, wo.size(0), 0).view(tgt_len, bsz, -1)\n\
        if BATCH_FIRST:\n\
        \x20   out = out.transpose(1, 0)\n\
        return out, weights\n";
    let projections = if separate {
        // Separate weights: each whole, each with its own scale; the bias rows by offset.
        "qw, sw = self._ta_w_in()\n\
         q = self._ta_project(xq, sq, qw, sw, b, 0, embed, 0)\n\
         kw, skw = self._ta_w_k()\n\
         k = self._ta_project(xk, sk, kw, skw, b, 0, embed, embed)\n\
         vw, svw = self._ta_w_v()\n\
         v = self._ta_project(xv, sv, vw, svw, b, 0, embed, 2 * embed)\n"
    } else {
        "qw, sw = self._ta_w_in()\n\
         q = self._ta_project(xq, sq, qw, sw, b, 0, embed, 0)\n\
         k = self._ta_project(xk, sk, qw, sw, b, embed, embed, embed)\n\
         v = self._ta_project(xv, sv, qw, sw, b, 2 * embed, embed, 2 * embed)\n"
    };
    let forward = forward.replace("PROJECTIONS", projections);
    let (schema, forward) = match traced {
        None => (SCHEMA.to_string(), forward),
        Some(TracedAttention { heads, weights, sources, weights_first }) => {
            let (returns, result) = match (weights, weights_first) {
                (None, _) => ("Tensor", "return out\n"),
                (Some(_), false) => {
                    ("Tuple[Tensor, Tensor]", "assert weights is not None\nreturn out, weights\n")
                }
                (Some(_), true) => {
                    ("Tuple[Tensor, Tensor]", "assert weights is not None\nreturn weights, out\n")
                }
            };
            let biases = if bias {
                ""
            } else {
                "in_bias: Optional[Tensor] = None\nout_bias: Optional[Tensor] = None\n"
            };
            // The traced inputs as query, key and value (one tensor where they were one, so
            // that `key is query` holds as it did), the arguments tracing fixed, then the
            // scripted forward on them.
            let [q, k, v] = sources;
            let key = if k == q { "query".to_string() } else { format!("input_{k}") };
            let value = if v == q {
                "query".to_string()
            } else if v == k {
                "key".to_string()
            } else {
                format!("input_{v}")
            };
            let roles = format!("query = input_{q}\nkey = {key}\nvalue = {value}\n");
            let fixed = format!(
                "{roles}key_padding_mask: Optional[Tensor] = None\n\
                 attn_mask: Optional[Tensor] = None\nneed_weights = {}\naverage_attn_weights = {}\n\
                 is_causal = False\n{biases}",
                py_bool(weights.is_some()),
                py_bool(weights.unwrap_or(true))
            );
            let mut body =
                fixed + forward.strip_suffix("return out, weights\n").expect("the forward ends so");
            body += result;
            body = body
                .replace("self.num_heads", &heads.to_string())
                .replace("self.dropout if self.training else 0.0", "0.0");
            if !bias {
                body = body.replace("self.in_proj_bias", "in_bias").replace("self.out_proj.bias", "out_bias");
            }
            let inputs: Vec<String> = (0..=q.max(k).max(v)).map(|i| format!("input_{i}: Tensor")).collect();
            (format!("def forward(self, {}) -> {returns}:\n", inputs.join(", ")), body)
        }
    };
    let mut methods = vec![
        input_method(s, "_ta_x_in", "x_quantizer", native),
        input_method(s, "_ta_x_out", "out_proj.x_quantizer", native),
        weight_method(s, "_ta_w_out", "out_proj.weight", "out_proj.", "out_", native),
        project,
        format!("{schema}{}", indent(&forward.replace("BATCH_FIRST", py_bool(batch_first)), 4)),
    ];
    if separate {
        methods.push(weight_method(s, "_ta_w_in", "q_proj_weight", "", "", native));
        methods.push(weight_method(s, "_ta_w_k", "k_proj_weight", "k_", "k_", native));
        methods.push(weight_method(s, "_ta_w_v", "v_proj_weight", "v_", "v_", native));
    } else {
        methods.push(weight_method(s, "_ta_w_in", "in_proj_weight", "", "", native));
    }
    methods.join("\n")
}
