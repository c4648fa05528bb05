//! The rewrite's plan: which submodules are Linear or Conv2d layers (and which stay in float,
//! and why), each layer's spec and geometry, then the quantizers and `forward`s put in place.

use tch::{CModule, Kind, Tensor};

use super::source::forward_source;
use super::{LayerOp, RewriteConfig, RewriteReport, RewrittenLayer};
use crate::glue::jit;
use crate::quantizers::{check_bitwidth, QuantizerKind};
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

/// The geometry of the one 2-d convolution in a layer's forward, from the glue's op list
/// ([`jit::forward_ops`]); `Err` says, in words, why the layer cannot be rewritten.
pub(super) fn conv_geometry(ops: &str) -> std::result::Result<[i64; 4], String> {
    const PADS: [&str; 5] = [
        "aten::pad",
        "aten::constant_pad_nd",
        "aten::reflection_pad2d",
        "aten::replicate_pad2d",
        "aten::_pad_circular",
    ];
    let lines: Vec<Vec<&str>> = ops.lines().map(|l| l.split('\t').collect()).collect();
    if lines.iter().any(|f| PADS.contains(&f[0])) {
        return Err("padding modes other than zeros are not supported".into());
    }
    let convs: Vec<&Vec<&str>> = lines
        .iter()
        .filter(|f| matches!(f[0], "aten::conv2d" | "aten::_convolution" | "aten::convolution"))
        .collect();
    let [conv] = convs.as_slice() else {
        return Err(format!("expected one 2-d convolution in forward, found {}", convs.len()));
    };
    let arg = |i: usize| conv.get(i + 1).copied().unwrap_or("?");
    let ints = |i: usize, what: &str| -> std::result::Result<i64, String> {
        let v: Vec<i64> = match arg(i).split_once(':') {
            Some(("l", list)) => list
                .split(',')
                .map(|x| x.parse().map_err(|_| ()))
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| format!("its {what} are not constants"))?,
            Some(("i", x)) => vec![x.parse().map_err(|_| format!("its {what} are not constants"))?],
            _ => return Err(format!("its {what} are not constants")),
        };
        match v.as_slice() {
            [a] => Ok(*a),
            [a, b] if a == b => Ok(*a),
            _ => Err(format!("a convolution with different {what} per dimension is not supported")),
        }
    };
    // aten::conv2d(input, weight, bias, stride, padding, dilation, groups); the others have
    // (..., stride, padding, dilation, transposed, output_padding, groups, ...).
    let groups_at = if conv[0] == "aten::conv2d" {
        if let Some(mode) = arg(4).strip_prefix("s:") {
            return Err(format!("padding='{mode}' is not supported"));
        }
        6
    } else {
        if arg(6) != "b:0" {
            return Err("transposed convolutions are not supported".into());
        }
        8
    };
    let groups = arg(groups_at)
        .strip_prefix("i:")
        .and_then(|g| g.parse().ok())
        .ok_or("its groups are not a constant")?;
    Ok([ints(3, "strides")?, ints(4, "paddings")?, ints(5, "dilations")?, groups])
}

/// A class name without TorchScript's `___torch_mangle_N` parts: `__torch__.torch.nn.modules.linear.Linear`.
fn demangled(class: &str) -> String {
    class.split('.').filter(|p| !p.starts_with("___torch_mangle_")).collect::<Vec<_>>().join(".")
}

/// The layer classes the rewrite covers, and the ones it reports as left in float.
fn classify(class: &str) -> Option<std::result::Result<&'static str, &'static str>> {
    match demangled(class).as_str() {
        "__torch__.torch.nn.modules.linear.Linear" => Some(Ok("Linear")),
        "__torch__.torch.nn.modules.conv.Conv2d" => Some(Ok("Conv2d")),
        "__torch__.torch.nn.modules.conv.Conv1d" => Some(Err("Conv1d")),
        "__torch__.torch.nn.modules.conv.Conv3d" => Some(Err("Conv3d")),
        "__torch__.torch.nn.modules.conv.ConvTranspose1d" => Some(Err("ConvTranspose1d")),
        "__torch__.torch.nn.modules.conv.ConvTranspose2d" => Some(Err("ConvTranspose2d")),
        "__torch__.torch.nn.modules.conv.ConvTranspose3d" => Some(Err("ConvTranspose3d")),
        "__torch__.torch.nn.modules.linear.Bilinear" => Some(Err("Bilinear")),
        _ => None,
    }
}

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
            Some(Err(kind)) => report.left_in_float.push(format!("{path}: {kind} is not covered")),
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
    for (path, class) in &layers {
        // Messages name the layer; a model that is one layer has the empty path.
        let label = if path.is_empty() { "the root module (the model itself)" } else { path.as_str() };
        let spec = spec_of(path);
        check_bitwidth(spec.x_bitwidth())?;
        check_bitwidth(spec.w_bitwidth())?;
        crate::args::check_positive("init_alpha", spec.init_alpha)?;
        if spec.x_kind == QuantizerKind::MinMax && spec.x_range != crate::quantizers::RangeMode::Batch {
            return Err(rewrite_layer(
                label,
                "MinMax inputs in the TorchScript rewrite take each call's range (RangeMode::Batch), not a running one (yet)".into(),
            ));
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
        let weight = param(&crate::layers::join(path, "weight"))
            .ok_or_else(|| rewrite_layer(label, "has no parameter weight".into()))?;
        let op = if classify(class) == Some(Ok("Linear")) {
            LayerOp::Linear
        } else {
            let g = conv_geometry(&jit::forward_ops(m, path)?)
                .map_err(|problem| rewrite_layer(label, problem))?;
            LayerOp::Conv2d { stride: g[0], padding: g[1], dilation: g[2], groups: g[3] }
        };
        let want = if op == LayerOp::Linear { 2 } else { 4 };
        if weight.dim() != want || !weight.is_floating_point() {
            return Err(rewrite_layer(
                label,
                format!("weight of shape {:?} is not a {want}-d float tensor", weight.size()),
            ));
        }
        let calls = d
            .calls
            .iter()
            .filter(|(parent, child, _)| {
                let full = if parent.is_empty() { child.clone() } else { format!("{parent}.{child}") };
                &full == path
            })
            .map(|(_, _, n)| n)
            .sum();
        report.layers.push(RewrittenLayer {
            name: path.clone(),
            class: class.clone(),
            op,
            bias: param(&crate::layers::join(path, "bias")).is_some(),
            spec,
            calls,
        });
    }
    // Instances of one class share `forward`: their sources must agree.
    for (i, a) in report.layers.iter().enumerate() {
        if let Some(b) = report.layers[..i].iter().find(|b| b.class == a.class) {
            if forward_source(b) != forward_source(a) {
                return Err(Error::SharedClass {
                    first: b.name.clone(),
                    second: a.name.clone(),
                    class: a.class.clone(),
                });
            }
        }
    }
    for layer in &report.layers {
        let weight_name = crate::layers::join(&layer.name, "weight");
        let device = param(&weight_name).map(|w| w.device()).unwrap_or(tch::Device::Cpu);
        let mut quantizers = Vec::new();
        if layer.spec.x_kind == QuantizerKind::Pact {
            quantizers.push(("x_quantizer", layer.spec.init_alpha));
        }
        if layer.spec.w_kind == QuantizerKind::Pact {
            let w = param(&weight_name).expect("checked above");
            let range = tch::no_grad(|| w.f_abs()?.f_max()?.f_double_value(&[]))?;
            quantizers.push(("w_quantizer", if range > 0.0 { range } else { 1.0 }));
        }
        for (name, init) in quantizers {
            // A parameter that trains: in a Rust loop and in PyTorch after torch.jit.load alike.
            let alpha = Tensor::f_full([1], init, (Kind::Float, device))?.f_set_requires_grad(true)?;
            jit::add_quantizer(m, &layer.name, name, "PACT", &alpha)?;
        }
    }
    let mut done: Vec<&str> = Vec::new();
    for layer in &report.layers {
        if done.contains(&layer.class.as_str()) {
            continue;
        }
        done.push(&layer.class);
        jit::replace_forward(m, &layer.name, &forward_source(layer))?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::conv_geometry;

    #[test]
    fn convolution_geometry_is_decided_from_the_op_list() {
        let scripted = "aten::size\t?\ti:0\naten::conv2d\t?\tt\tn\tl:2,2\tl:1,1\tl:1,1\ti:4\n";
        assert_eq!(conv_geometry(scripted), Ok([2, 1, 1, 4]));
        let traced =
            "aten::_convolution\t?\tt\tt\tl:1,1\tl:0,0\tl:2,2\tb:0\tl:0,0\ti:1\tb:0\tb:0\tb:1\tb:1\n";
        assert_eq!(conv_geometry(traced), Ok([1, 0, 2, 1]));
        let same = "aten::conv2d\t?\tt\tn\tl:1,1\ts:same\tl:1,1\ti:1\n";
        assert_eq!(conv_geometry(same), Err("padding='same' is not supported".into()));
        let reflect = "aten::pad\t?\tl:1,1,1,1\ts:reflect\tn\n".to_string() + scripted;
        assert_eq!(conv_geometry(&reflect), Err("padding modes other than zeros are not supported".into()));
        let asym = "aten::conv2d\t?\tt\tn\tl:1,2\tl:0,0\tl:1,1\ti:1\n";
        assert!(conv_geometry(asym).unwrap_err().contains("different strides per dimension"));
        let transposed = "aten::_convolution\t?\tt\tt\tl:1,1\tl:0,0\tl:1,1\tb:1\tl:0,0\ti:1\n";
        assert_eq!(conv_geometry(transposed), Err("transposed convolutions are not supported".into()));
        assert_eq!(
            conv_geometry("aten::relu\t?\n"),
            Err("expected one 2-d convolution in forward, found 0".into())
        );
    }
}
