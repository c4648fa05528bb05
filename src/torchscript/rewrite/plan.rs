//! The rewrite's plan: which submodules are Linear or Conv2d layers (and which stay in float,
//! and why), each layer's spec and geometry, then the quantizers and `forward`s put in place.

use tch::{CModule, Kind, Tensor};

use super::probe::{traced_attention, AttentionWeights};
use super::source::{caches_weight, forward_source, observes_inputs, APPROX_MULTIPLIER, WEIGHT_CACHE};
use super::{ConvPadding, InputPad, LayerOp, PadMode, RewriteConfig, RewriteReport, RewrittenLayer};
use crate::glue::jit::{self, AttrValue, QuantizerState};
use crate::layers::QuantSpec;
use crate::quantizers::{check_bitwidth, QuantizerKind, RangeMode};
use crate::{Error, Result};

fn rewrite_layer(layer: &str, problem: String) -> Error {
    Error::RewriteLayer { layer: layer.to_string(), problem }
}

/// The parsed output of `ta_module_describe`.
struct Description {
    modules: Vec<(String, String)>,
    ops: Vec<(String, String, usize)>,
    calls: Vec<(String, String, usize)>,
}

fn describe(m: &CModule) -> Result<Description> {
    let text = jit::describe(m)?;
    let mut d = Description { modules: Vec::new(), ops: Vec::new(), calls: Vec::new() };
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["M", path, class] => d.modules.push((path.to_string(), class.to_string())),
            ["O", path, op, n] if is_weighted_op(op) => {
                d.ops.push((path.to_string(), op.to_string(), n.parse().unwrap_or(0)))
            }
            ["C", path, child, n] => {
                d.calls.push((path.to_string(), child.to_string(), n.parse().unwrap_or(0)))
            }
            _ => {}
        }
    }
    Ok(d)
}

/// The ops with a weight that the rewrite reports when they are called outside a covered layer.
fn is_weighted_op(op: &str) -> bool {
    op == "aten::linear" || op == "aten::matmul" || op == "aten::_convolution" || op.starts_with("aten::conv")
}

/// The geometry of the one 2-d convolution in a layer's forward (and the pad before it, for a
/// `padding_mode` other than zeros), from the glue's op list ([`jit::forward_ops`]); `Err`
/// says, in words, why the layer cannot be rewritten.
pub(super) fn conv_geometry(ops: &str, kernel: [i64; 2]) -> std::result::Result<LayerOp, String> {
    let lines: Vec<Vec<&str>> = ops.lines().map(|l| l.split('\t').collect()).collect();
    let arg = |f: &[&str], i: usize| f.get(i + 1).copied().unwrap_or("?").to_string();
    let ints = |v: &str, what: &str| -> std::result::Result<Vec<i64>, String> {
        match v.split_once(':') {
            Some(("l", list)) => list.split(',').map(|x| x.parse().map_err(|_| ())).collect(),
            Some(("i", x)) => x.parse().map(|x| vec![x]).map_err(|_| ()),
            _ => Err(()),
        }
        .map_err(|_| format!("its {what} are not constants"))
    };
    let pair = |v: &str, what: &str| -> std::result::Result<[i64; 2], String> {
        match ints(v, what)?.as_slice() {
            [a] => Ok([*a, *a]),
            [a, b] => Ok([*a, *b]),
            other => Err(format!("its {what} {other:?} are not one or two numbers")),
        }
    };
    let mut input_pad = None;
    for f in lines.iter().filter(|f| {
        matches!(
            f[0],
            "aten::pad"
                | "aten::constant_pad_nd"
                | "aten::reflection_pad2d"
                | "aten::replication_pad2d"
                | "aten::_pad_circular"
        )
    }) {
        if input_pad.is_some() {
            return Err("its forward pads its input more than once".into());
        }
        let sides: [i64; 4] = ints(&arg(f, 1), "pad sides")?
            .try_into()
            .map_err(|s: Vec<i64>| format!("its input pad has {} sides, not 4", s.len()))?;
        let (mode, value) = match f[0] {
            "aten::pad" => {
                let mode = arg(f, 2);
                let mode = mode.strip_prefix("s:").ok_or("its pad mode is not a constant")?;
                let mode =
                    PadMode::from_name(mode).ok_or_else(|| format!("pad mode '{mode}' is not supported"))?;
                (mode, arg(f, 3))
            }
            "aten::constant_pad_nd" => (PadMode::Constant, arg(f, 2)),
            "aten::reflection_pad2d" => (PadMode::Reflect, "n".into()),
            "aten::replication_pad2d" => (PadMode::Replicate, "n".into()),
            _ => (PadMode::Circular, "n".into()),
        };
        // A zero pad quantizes to zeros; any other constant would need its own quantization.
        if mode == PadMode::Constant && !matches!(value.as_str(), "n" | "i:0" | "f:0") {
            return Err(format!(
                "a constant pad of value {} is not supported",
                value.trim_start_matches("f:")
            ));
        }
        input_pad = Some(InputPad { mode, sides });
    }
    let convs: Vec<&Vec<&str>> = lines
        .iter()
        .filter(|f| {
            matches!(
                f[0],
                "aten::conv2d" | "aten::_convolution" | "aten::convolution" | "aten::_convolution_mode"
            )
        })
        .collect();
    let [conv] = convs.as_slice() else {
        return Err(format!("expected one 2-d convolution in forward, found {}", convs.len()));
    };
    // aten::conv2d and aten::_convolution_mode are (input, weight, bias, stride, padding,
    // dilation, groups); the others (..., stride, padding, dilation, transposed,
    // output_padding, groups, ...).
    let groups_at = if matches!(conv[0], "aten::conv2d" | "aten::_convolution_mode") {
        6
    } else {
        if arg(conv, 6) != "b:0" {
            return Err("transposed convolutions are not supported".into());
        }
        8
    };
    let padding = match arg(conv, 4).strip_prefix("s:") {
        Some("same") => ConvPadding::Same,
        Some("valid") => ConvPadding::Zeros([0, 0]),
        Some(mode) => return Err(format!("padding='{mode}' is not supported")),
        None => ConvPadding::Zeros(pair(&arg(conv, 4), "paddings")?),
    };
    let groups = arg(conv, groups_at)
        .strip_prefix("i:")
        .and_then(|g| g.parse().ok())
        .ok_or("its groups are not a constant")?;
    Ok(LayerOp::Conv2d {
        kernel,
        stride: pair(&arg(conv, 3), "strides")?,
        padding,
        dilation: pair(&arg(conv, 5), "dilations")?,
        groups,
        input_pad,
    })
}

/// A class name without TorchScript's `___torch_mangle_N` parts: `__torch__.torch.nn.modules.linear.Linear`.
fn demangled(class: &str) -> String {
    class.split('.').filter(|p| !p.starts_with("___torch_mangle_")).collect::<Vec<_>>().join(".")
}

/// The layer classes the rewrite covers (`Ok`), and the ones it reports as left in float with
/// the reason (`Err`).
fn classify(class: &str) -> Option<std::result::Result<&'static str, &'static str>> {
    let class = demangled(class);
    let name = class.strip_prefix("__torch__.torch.nn.modules.")?;
    Some(match name {
        "linear.Linear" => Ok("Linear"),
        "conv.Conv2d" => Ok("Conv2d"),
        "conv.Conv1d" => Err("Conv1d is not covered"),
        "conv.Conv3d" => Err("Conv3d is not covered"),
        "conv.ConvTranspose1d" => Err("ConvTranspose1d is not covered"),
        "conv.ConvTranspose2d" => Err("ConvTranspose2d is not covered"),
        "conv.ConvTranspose3d" => Err("ConvTranspose3d is not covered"),
        "linear.Bilinear" => Err("Bilinear is not covered"),
        "activation.MultiheadAttention" => Ok("MultiheadAttention"),
        // MultiheadAttention's `out_proj`: its parent reads the weight, never calls its forward,
        // and rewrites or reports it with itself.
        "linear.NonDynamicallyQuantizableLinear" => Err(OUT_PROJ),
        _ => return None,
    })
}

/// Whether `path` is the `out_proj` of a `MultiheadAttention` in the description.
fn attention_owns(d: &Description, path: &str) -> bool {
    let Some(parent) = path.strip_suffix(".out_proj") else {
        return false;
    };
    d.modules.iter().any(|(p, class)| p == parent && classify(class) == Some(Ok("MultiheadAttention")))
}

/// The reason given for an attention's `out_proj`, which its attention's entry replaces.
const OUT_PROJ: &str = "a MultiheadAttention's out_proj, which the attention itself reads";

const QUANTIZER_CLASS: &str = "__torch__.torchapprox.quantizers.";

/// Plans and applies the rewrite on `m` (not yet run), whose parameters are `params`.
pub(crate) fn rewrite(
    m: &CModule,
    params: &[(String, Tensor)],
    config: &RewriteConfig,
) -> Result<RewriteReport> {
    let d = describe(m)?;
    if let Some((path, _)) = d.modules.iter().find(|(_, c)| c.starts_with(QUANTIZER_CLASS)) {
        return Err(Error::AlreadyRewritten { quantizer: path.clone() });
    }
    let mut report = RewriteReport::default();
    let mut layers: Vec<(String, String)> = Vec::new();
    for (path, class) in &d.modules {
        match classify(class) {
            Some(Ok(_)) => layers.push((path.clone(), class.clone())),
            // An attention's out_proj is quantized inside the attention's forward, or stays in
            // float with it, for the attention's reason.
            Some(Err(OUT_PROJ)) if attention_owns(&d, path) => {}
            Some(Err(reason)) => report.left_in_float.push(format!("{path}: {reason}")),
            None => {}
        }
    }
    for (path, op, n) in &d.ops {
        let covered = layers.iter().any(|(p, _)| p == path);
        if !covered && !d.modules.iter().any(|(p, c)| p == path && matches!(classify(c), Some(Err(_)))) {
            let at = if path.is_empty() { "the top module" } else { path.as_str() };
            report.left_in_float.push(format!("{at}: {n} functional {op} call(s) in its code"));
        }
    }
    if layers.is_empty() {
        return Err(Error::TorchScript("no Linear or Conv2d layer to quantize".into()));
    }
    let names: Vec<&str> = layers.iter().map(|(p, _)| p.as_str()).collect();
    for (i, (name, _)) in config.overrides.iter().enumerate() {
        if !names.contains(&name.as_str()) {
            return Err(Error::UnknownLayers {
                unknown: vec![name.clone()],
                model: None,
                known: names.iter().map(|n| n.to_string()).collect(),
            });
        }
        if config.overrides[..i].iter().any(|(n, _)| n == name) {
            return Err(Error::RepeatedLayer { name: name.clone(), same_as: name.clone() });
        }
    }
    let spec_of =
        |name: &str| config.overrides.iter().find(|(n, _)| n == name).map_or(config.default, |(_, s)| *s);
    let param = |name: &str| params.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
    // Layers planned for the rewrite, and those that stay in float with the reason.
    let mut planned: Vec<RewrittenLayer> = Vec::new();
    let mut skipped: Vec<(String, String, String)> = Vec::new();
    for (path, class) in &layers {
        // Messages name the layer; a model that is one layer has the empty path.
        let label = if path.is_empty() { "the root module (the model itself)" } else { path.as_str() };
        let spec = spec_of(path);
        check_spec(label, &spec)?;
        match plan_layer(m, path, class, &param)? {
            Ok((op, bias)) => {
                let calls = d
                    .calls
                    .iter()
                    .filter(|(parent, child, _)| &crate::layers::join(parent, child) == path)
                    .map(|(_, _, n)| n)
                    .sum();
                planned.push(RewrittenLayer {
                    name: path.clone(),
                    class: class.clone(),
                    op,
                    bias,
                    spec,
                    calls,
                })
            }
            Err(problem) => skipped.push((path.clone(), class.clone(), problem)),
        }
    }
    // Instances of a class share one `forward`: when one stays in float, all of them do.
    while let Some(i) = planned.iter().position(|l| skipped.iter().any(|(_, class, _)| class == &l.class)) {
        let l = planned.remove(i);
        let (other, _, _) = skipped.iter().find(|(_, class, _)| class == &l.class).expect("found above");
        let problem = format!("it shares its TorchScript class with {other}, which stays in float");
        skipped.push((l.name, l.class, problem));
    }
    let layer_order = |name: &str| layers.iter().position(|(p, _)| p == name);
    skipped.sort_by_key(|(path, _, _)| layer_order(path));
    for (path, _, problem) in &skipped {
        let at = if path.is_empty() { "the root module" } else { path.as_str() };
        report.left_in_float.push(format!("{at}: {problem}"));
    }
    if config.strict && !report.left_in_float.is_empty() {
        return Err(Error::LeftInFloat { layers: report.left_in_float });
    }
    if planned.is_empty() {
        return Err(Error::TorchScript(format!(
            "no Linear or Conv2d layer could be rewritten: {}",
            report.left_in_float.join("; ")
        )));
    }
    for (i, a) in planned.iter().enumerate() {
        if let Some(b) = planned[..i].iter().find(|b| b.class == a.class) {
            let optional = optional_bias(&planned, &a.class);
            if forward_source(b, optional, false) != forward_source(a, optional, false) {
                return Err(Error::SharedClass {
                    first: b.name.clone(),
                    second: a.name.clone(),
                    class: a.class.clone(),
                });
            }
        }
    }
    for layer in &planned {
        add_quantizers(m, layer, &param)?;
    }
    reset_weight_caches(m, &planned)?;
    for layer in &planned {
        // Exact products until a multiplier is set (ScriptModel::set_multiplier).
        jit::set_attr(m, &layer.name, APPROX_MULTIPLIER, AttrValue::Int(-1))?;
    }
    // The in-memory forwards call the crate's operators: their kernels must be in place.
    crate::glue::ops::install()?;
    replace_forwards(m, &planned, false)?;
    report.layers = planned;
    Ok(report)
}

/// Whether the class's instances differ in having a bias (scripted `bias=None` and
/// `bias=True` layers of one shape share a class): then it reads its bias as optional.
fn optional_bias(layers: &[RewrittenLayer], class: &str) -> bool {
    let mut of_class = layers.iter().filter(|l| l.class == class);
    let first = of_class.next().map(|l| l.bias);
    of_class.any(|l| Some(l.bias) != first)
}

/// Gives each class of `layers` its generated `forward`: the crate's (`portable` false) or
/// the one saved files carry, which plain PyTorch runs.
pub(crate) fn replace_forwards(m: &CModule, layers: &[RewrittenLayer], portable: bool) -> Result<()> {
    let mut done: Vec<&str> = Vec::new();
    for layer in layers {
        if done.contains(&layer.class.as_str()) {
            continue;
        }
        done.push(&layer.class);
        let source = forward_source(layer, optional_bias(layers, &layer.class), portable);
        jit::replace_forward(m, &layer.name, &source)?;
    }
    Ok(())
}

/// Empties the weight cache of each layer that keeps one (the no-grad path's copy, also the
/// buffer training writes its integers into; declared on first use): after the rewrite, and
/// before a save, so that files carry no stale copies.
pub(crate) fn reset_weight_caches(m: &CModule, layers: &[RewrittenLayer]) -> Result<()> {
    let [cache, scale, weight, version] = WEIGHT_CACHE;
    for l in layers.iter().filter(|l| caches_weight(&l.spec)) {
        let empty = Tensor::f_zeros([0], (Kind::Float, tch::Device::Cpu))?;
        // An attention caches its projections' weights: `w_cache...` and `out_w_cache...`,
        // with `k_w_cache...` and `v_w_cache...` for separate key and value weights.
        let prefixes: &[&str] = match l.op {
            LayerOp::Attention { separate: true, .. } => &["", "k_", "v_", "out_"],
            LayerOp::Attention { .. } => &["", "out_"],
            _ => &[""],
        };
        for prefix in prefixes {
            for name in [cache, scale, weight] {
                jit::set_attr(m, &l.name, &format!("{prefix}{name}"), AttrValue::Tensor(&empty))?;
            }
            jit::set_attr(m, &l.name, &format!("{prefix}{version}"), AttrValue::Int(-1))?;
        }
    }
    Ok(())
}

/// Refuses settings the rewrite cannot carry out; these are the caller's own, so an error.
fn check_spec(label: &str, spec: &QuantSpec) -> Result<()> {
    check_bitwidth(spec.x_bitwidth())?;
    check_bitwidth(spec.w_bitwidth())?;
    crate::args::check_positive("init_alpha", spec.init_alpha)?;
    if let RangeMode::Running { momentum } = spec.x_range {
        if spec.x_kind == QuantizerKind::MinMax && !(0.0..1.0).contains(&momentum) {
            return Err(Error::Argument {
                what: "running range momentum",
                value: momentum,
                expected: "in [0, 1)",
            });
        }
    }
    if spec.per_channel && spec.w_kind != QuantizerKind::MinMax {
        return Err(Error::PerChannel(spec.w_kind));
    }
    if spec.x_kind == QuantizerKind::Lsq || spec.w_kind == QuantizerKind::Lsq {
        return Err(rewrite_layer(
            label,
            "the TorchScript rewrite covers pact and minmax, not lsq (yet)".into(),
        ));
    }
    Ok(())
}

/// The op and whether there is a bias, for the layer at `path`; `Err` says why it stays in float.
fn plan_layer(
    m: &CModule,
    path: &str,
    class: &str,
    param: &dyn Fn(&str) -> Option<Tensor>,
) -> Result<std::result::Result<(LayerOp, bool), String>> {
    if classify(class) == Some(Ok("MultiheadAttention")) {
        return plan_attention(m, path, param);
    }
    let Some(weight) = param(&crate::layers::join(path, "weight")) else {
        return Ok(Err("it has no parameter weight".into()));
    };
    let linear = classify(class) == Some(Ok("Linear"));
    let want = if linear { 2 } else { 4 };
    if weight.dim() != want || !weight.is_floating_point() {
        return Ok(Err(format!("its weight of shape {:?} is not a {want}-d float tensor", weight.size())));
    }
    let op = if linear {
        LayerOp::Linear
    } else {
        let size = weight.size();
        match conv_geometry(&jit::forward_ops(m, path)?, [size[2], size[3]]) {
            Ok(op) => op,
            Err(problem) => return Ok(Err(problem)),
        }
    };
    Ok(Ok((op, param(&crate::layers::join(path, "bias")).is_some())))
}

/// A MultiheadAttention's plan: a packed or separate input projection, no `bias_k`/`bias_v`,
/// no `add_zero_attn`; scripted (its forward has `need_weights`), or traced and recognised by
/// [`traced_attention`]. `Err` says why it stays in float.
fn plan_attention(
    m: &CModule,
    path: &str,
    param: &dyn Fn(&str) -> Option<Tensor>,
) -> Result<std::result::Result<(LayerOp, bool), String>> {
    let text = jit::inspect(m, path, &["_qkv_same_embed_dim", "add_zero_attn", "bias_k", "batch_first"])?;
    let schema = text.lines().next().unwrap_or_default();
    let attr = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}\t")).map(str::to_string))
            .unwrap_or_default()
    };
    let named = |p: &str| param(&crate::layers::join(path, p));
    let scripted = schema.contains("need_weights");
    // A traced attention keeps no settings: a packed projection shows as `in_proj_weight`,
    // bias_k/bias_v as parameters of their own.
    let packed =
        if scripted { attr("_qkv_same_embed_dim") == "b:1" } else { named("q_proj_weight").is_none() };
    let Some(out_weight) = named("out_proj.weight") else {
        return Ok(Err("a MultiheadAttention without out_proj.weight".into()));
    };
    // The query's, key's and value's weights: rows of the packed projection, or separate ones.
    let e = out_weight.size()[0];
    let qkv = if packed {
        match named("in_proj_weight") {
            Some(w) if w.size() == [3 * e, e] => {
                [w.f_narrow(0, 0, e)?, w.f_narrow(0, e, e)?, w.f_narrow(0, 2 * e, e)?]
            }
            Some(w) => {
                return Ok(Err(format!(
                    "a MultiheadAttention whose in_proj_weight of shape {:?} is not [3 E, E]",
                    w.size()
                )))
            }
            None => return Ok(Err("a MultiheadAttention without in_proj_weight".into())),
        }
    } else {
        match ["q_proj_weight", "k_proj_weight", "v_proj_weight"].map(|p| (p, named(p))) {
            [(_, Some(q)), (_, Some(k)), (_, Some(v))] => [q, k, v],
            named => {
                let p = named.iter().find(|(_, t)| t.is_none()).map_or("", |(p, _)| p);
                return Ok(Err(format!(
                    "a MultiheadAttention with separate projections but no parameter {p}"
                )));
            }
        }
    };
    let extra_keys = if scripted {
        attr("add_zero_attn") != "b:0" || attr("bias_k") != "n"
    } else {
        named("bias_k").is_some()
    };
    if extra_keys {
        return Ok(Err(
            "a MultiheadAttention with add_zero_attn or bias_k/bias_v is not covered (yet)".into()
        ));
    }
    let bias = named("in_proj_bias").is_some();
    if scripted {
        let batch_first = attr("batch_first") == "b:1";
        return Ok(Ok((LayerOp::Attention { batch_first, traced: None, separate: !packed }, bias)));
    }
    let weights = AttentionWeights {
        qkv,
        in_bias: named("in_proj_bias"),
        out_weight,
        out_bias: named("out_proj.bias"),
    };
    Ok(traced_attention(m, path, schema, &weights)?.map(|(t, batch_first)| {
        (LayerOp::Attention { batch_first, traced: Some(t), separate: !packed }, bias)
    }))
}

/// The layer's quantizer submodules: a PACT `alpha` parameter per PACT quantizer (trained, in
/// a Rust loop and in PyTorch after `torch.jit.load` alike), a `running_max` buffer for
/// running MinMax inputs.
fn add_quantizers(m: &CModule, layer: &RewrittenLayer, param: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
    let name = |p: &str| crate::layers::join(&layer.name, p);
    let weight =
        |p: &str| param(&name(p)).ok_or_else(|| rewrite_layer(&layer.name, format!("has no parameter {p}")));
    let (path, spec) = (layer.name.as_str(), &layer.spec);
    match layer.op {
        LayerOp::Attention { separate, .. } => {
            // The input projections' quantizers on the attention (`x_quantizer` for query, key
            // and value; a weight quantizer per weight), the output projection's on out_proj.
            let w = weight(if separate { "q_proj_weight" } else { "in_proj_weight" })?;
            add_input_quantizer(m, path, spec, w.device())?;
            add_weight_quantizer(m, path, "w_quantizer", spec, &w)?;
            if separate {
                add_weight_quantizer(m, path, "k_w_quantizer", spec, &weight("k_proj_weight")?)?;
                add_weight_quantizer(m, path, "v_w_quantizer", spec, &weight("v_proj_weight")?)?;
            }
            let w = weight("out_proj.weight")?;
            add_input_quantizer(m, &name("out_proj"), spec, w.device())?;
            add_weight_quantizer(m, &name("out_proj"), "w_quantizer", spec, &w)
        }
        _ => {
            let w = weight("weight")?;
            add_input_quantizer(m, path, spec, w.device())?;
            add_weight_quantizer(m, path, "w_quantizer", spec, &w)
        }
    }
}

/// The input quantizer submodule `x_quantizer` of the module at `path`, where it has state.
fn add_input_quantizer(m: &CModule, path: &str, spec: &QuantSpec, device: tch::Device) -> Result<()> {
    if spec.x_kind == QuantizerKind::Pact {
        let alpha = Tensor::f_full([1], spec.init_alpha, (Kind::Float, device))?.f_set_requires_grad(true)?;
        jit::add_quantizer(m, path, "x_quantizer", "PACT", QuantizerState::Parameter("alpha", &alpha))?;
    } else if observes_inputs(spec) {
        let running = Tensor::f_zeros([1], (Kind::Float, device))?;
        jit::add_quantizer(
            m,
            path,
            "x_quantizer",
            "MinMax",
            QuantizerState::Buffer("running_max", &running),
        )?;
    }
    Ok(())
}

/// The weight quantizer submodule `name` of the module at `path` for `weight`, where it has
/// state: PACT's alpha, starting at the weight's largest magnitude.
fn add_weight_quantizer(
    m: &CModule,
    path: &str,
    name: &str,
    spec: &QuantSpec,
    weight: &Tensor,
) -> Result<()> {
    if spec.w_kind == QuantizerKind::Pact {
        let range = tch::no_grad(|| weight.f_abs()?.f_max()?.f_double_value(&[]))?;
        let init = if range > 0.0 { range } else { 1.0 };
        let alpha = Tensor::f_full([1], init, (Kind::Float, weight.device()))?.f_set_requires_grad(true)?;
        jit::add_quantizer(m, path, name, "PACT", QuantizerState::Parameter("alpha", &alpha))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convolution_geometry_is_decided_from_the_op_list() {
        let conv = |stride, padding, dilation, groups, input_pad| LayerOp::Conv2d {
            kernel: [3, 3],
            stride,
            padding,
            dilation,
            groups,
            input_pad,
        };
        let scripted = "aten::size\t?\ti:0\naten::conv2d\t?\tt\tn\tl:2,2\tl:1,1\tl:1,1\ti:4\n";
        assert_eq!(
            conv_geometry(scripted, [3, 3]),
            Ok(conv([2, 2], ConvPadding::Zeros([1, 1]), [1, 1], 4, None))
        );
        let traced =
            "aten::_convolution\t?\tt\tt\tl:1,2\tl:0,3\tl:2,1\tb:0\tl:0,0\ti:1\tb:0\tb:0\tb:1\tb:1\n";
        assert_eq!(
            conv_geometry(traced, [3, 3]),
            Ok(conv([1, 2], ConvPadding::Zeros([0, 3]), [2, 1], 1, None))
        );
        let same = "aten::_convolution_mode\t?\tt\tn\tl:1,1\ts:same\tl:1,2\ti:1\n";
        assert_eq!(conv_geometry(same, [3, 3]), Ok(conv([1, 1], ConvPadding::Same, [1, 2], 1, None)));
        let valid = "aten::conv2d\t?\tt\tn\tl:1,1\ts:valid\tl:1,1\ti:1\n";
        assert_eq!(
            conv_geometry(valid, [3, 3]),
            Ok(conv([1, 1], ConvPadding::Zeros([0, 0]), [1, 1], 1, None))
        );
        let reflect = "aten::pad\t?\tl:1,1,2,2\ts:reflect\tn\n".to_string() + scripted;
        let pad = InputPad { mode: PadMode::Reflect, sides: [1, 1, 2, 2] };
        assert_eq!(
            conv_geometry(&reflect, [3, 3]),
            Ok(conv([2, 2], ConvPadding::Zeros([1, 1]), [1, 1], 4, Some(pad)))
        );
        let seven = "aten::pad\t?\tl:1,1,1,1\ts:constant\tf:7\n".to_string() + scripted;
        assert_eq!(conv_geometry(&seven, [3, 3]), Err("a constant pad of value 7 is not supported".into()));
        let twice = "aten::pad\t?\tl:1,1,1,1\ts:reflect\tn\n".repeat(2) + scripted;
        assert_eq!(conv_geometry(&twice, [3, 3]), Err("its forward pads its input more than once".into()));
        let three = "aten::conv2d\t?\tt\tn\tl:1,1,1\tl:0,0\tl:1,1\ti:1\n";
        assert!(conv_geometry(three, [3, 3])
            .unwrap_err()
            .contains("strides [1, 1, 1] are not one or two numbers"));
        let transposed = "aten::_convolution\t?\tt\tt\tl:1,1\tl:0,0\tl:1,1\tb:1\tl:0,0\ti:1\n";
        assert_eq!(
            conv_geometry(transposed, [3, 3]),
            Err("transposed convolutions are not supported".into())
        );
        assert_eq!(
            conv_geometry("aten::relu\t?\n", [3, 3]),
            Err("expected one 2-d convolution in forward, found 0".into())
        );
    }
}
