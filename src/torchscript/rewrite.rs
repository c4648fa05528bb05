//! Quantized layers inside a TorchScript model: each Linear and Conv2d gets a new `forward`, in
//! TorchScript, that quantizes its input and weight as the crate's layers do.

use std::ffi::{c_char, c_void, CString};

use tch::{CModule, Kind, Tensor};

use super::ts_error;
use crate::glue::check;

use crate::quantizers::{check_bitwidth, int_max, QuantizerKind, ALPHA_MAX, ALPHA_MIN, MIN_RANGE};
use crate::{Error, Result};

type CTensor = torch_sys::C_tensor;

extern "C" {
    fn ta_module_describe(m: *const c_void, out: *mut *mut c_char) -> *mut c_char;
    fn ta_module_conv_geometry(m: *const c_void, path: *const c_char, out: *mut i64) -> *mut c_char;
    fn ta_module_add_quantizer(
        m: *const c_void,
        path: *const c_char,
        name: *const c_char,
        type_name: *const c_char,
        alpha: *const CTensor,
    ) -> *mut c_char;
    fn ta_module_replace_forward(m: *const c_void, path: *const c_char, source: *const c_char)
        -> *mut c_char;
    fn ta_module_set_bool(
        m: *const c_void,
        path: *const c_char,
        name: *const c_char,
        value: i32,
    ) -> *mut c_char;
    fn ta_module_get_tensor(
        m: *const c_void,
        path: *const c_char,
        name: *const c_char,
        out: *mut *mut CTensor,
    ) -> *mut c_char;
    fn ta_module_save_bytes(m: *const c_void, out: *mut *mut c_char, len: *mut i64) -> *mut c_char;
    fn ta_module_named_buffers(
        m: *const c_void,
        data: *mut c_void,
        f: extern "C" fn(*mut c_void, *const c_char, *mut CTensor),
    ) -> *mut c_char;
}

// tch keeps its module pointer private; `CModule` is exactly that one pointer.
const _: () = assert!(std::mem::size_of::<CModule>() == std::mem::size_of::<*mut c_void>());

/// The libtorch module behind a `CModule`.
fn module_ptr(m: &CModule) -> *const c_void {
    // SAFETY: CModule is a struct of one raw pointer (checked above), so its bytes are that pointer.
    unsafe { *(m as *const CModule as *const *const c_void) }
}

/// Every buffer of the module and its submodules, by dotted name (`bn1.running_mean`).
pub(super) fn named_buffers(m: &CModule) -> Result<Vec<(String, Tensor)>> {
    extern "C" fn push(data: *mut c_void, name: *const c_char, t: *mut CTensor) {
        // SAFETY: `data` is the Vec below, `name` a NUL-terminated string and `t` a new
        // tensor handle whose ownership passes to us, all for the duration of this call.
        unsafe {
            let out = &mut *(data as *mut Vec<(String, Tensor)>);
            let name = std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned();
            out.push((name, Tensor::from_ptr(t)));
        }
    }
    let mut out: Vec<(String, Tensor)> = Vec::new();
    // SAFETY: a valid module pointer; `push` only runs during the call.
    glue(unsafe { ta_module_named_buffers(module_ptr(m), &mut out as *mut _ as *mut c_void, push) })?;
    Ok(out)
}

/// The module as `torch.jit.save` writes it, in memory.
pub(super) fn module_bytes(m: &CModule) -> Result<Vec<u8>> {
    let (mut p, mut len) = (std::ptr::null_mut::<c_char>(), 0i64);
    // SAFETY: a valid module pointer; on success `p` holds `len` malloc'ed bytes, ours to free.
    glue(unsafe { ta_module_save_bytes(module_ptr(m), &mut p, &mut len) })?;
    // SAFETY: as above; copied before the glue's buffer is freed.
    let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, len as usize).to_vec() };
    // SAFETY: the malloc'ed buffer, not used afterwards.
    unsafe { crate::glue::free(p) };
    Ok(bytes)
}

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| ts_error(format!("{s:?} holds a NUL byte")))
}

fn glue(err: *mut c_char) -> Result<()> {
    check(err).map_err(|msg| ts_error(crate::strip_backtrace(&msg)))
}

/// The quantizers and bitwidths of one rewritten layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerQuantSpec {
    /// Input quantizer: `Pact` (learnable `x_quantizer.alpha`) or `MinMax` (range of each call).
    pub x_kind: QuantizerKind,
    /// Weight quantizer: `MinMax` or `Pact` (`w_quantizer.alpha`, starting at `max |w|`).
    pub w_kind: QuantizerKind,
    /// Bits of the input, `2..=16`.
    pub x_bits: u32,
    /// Bits of the weight, `2..=16`.
    pub w_bits: u32,
    /// One MinMax weight range per output channel.
    pub per_channel: bool,
    /// Round to integers (`true`); `false` keeps the scaled, clipped values, as the
    /// quantizers' `rounded` flag (for gradient checks by finite differences).
    pub rounded: bool,
}

impl Default for LayerQuantSpec {
    /// PACT inputs and MinMax weights, 8 bits each, per tensor: the trainer's defaults.
    fn default() -> Self {
        Self {
            x_kind: QuantizerKind::Pact,
            w_kind: QuantizerKind::MinMax,
            x_bits: 8,
            w_bits: 8,
            per_channel: false,
            rounded: true,
        }
    }
}

/// Settings of [`ScriptModel::quantize_layers`](super::ScriptModel::quantize_layers).
#[derive(Debug, Clone, PartialEq)]
pub struct RewriteConfig {
    /// The spec of every layer without an override.
    pub default: LayerQuantSpec,
    /// Per-layer specs by module path (`layer1.0.conv1`).
    pub overrides: Vec<(String, LayerQuantSpec)>,
    /// PACT's initial input clipping level (TorchApprox's 2.2); [`calibrate`](super::ScriptModel::calibrate) replaces it.
    pub init_alpha: f64,
}

impl Default for RewriteConfig {
    fn default() -> Self {
        Self { default: LayerQuantSpec::default(), overrides: Vec::new(), init_alpha: 2.2 }
    }
}

/// The operation of a rewritten layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOp {
    /// `nn.Linear`.
    Linear,
    /// `nn.Conv2d` with its stride, padding, dilation and groups.
    Conv2d {
        /// Step of the kernel.
        stride: i64,
        /// Zero padding on each side.
        padding: i64,
        /// Spacing of the kernel's taps.
        dilation: i64,
        /// Channel groups.
        groups: i64,
    },
}

/// One layer the rewrite turned into a quantized layer.
#[derive(Debug, Clone, PartialEq)]
pub struct RewrittenLayer {
    /// Module path, e.g. `layer1.0.conv1`.
    pub name: String,
    /// Its TorchScript class (instances of one class share their `forward`).
    pub class: String,
    /// Linear or Conv2d, with the convolution's geometry.
    pub op: LayerOp,
    /// Whether the layer has a bias.
    pub bias: bool,
    /// The quantizers and bits.
    pub spec: LayerQuantSpec,
    /// How many call sites in its parents' code call it (2 or more: called twice in one forward).
    pub calls: usize,
}

/// What [`quantize_layers`](super::ScriptModel::quantize_layers) did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RewriteReport {
    /// The rewritten layers, in module order.
    pub layers: Vec<RewrittenLayer>,
    /// What stays in float, each with the reason (`conv0: Conv1d is not covered`, ...).
    pub left_in_float: Vec<String>,
}

/// The parsed output of `ta_module_describe`.
struct Description {
    modules: Vec<(String, String)>,
    ops: Vec<(String, String, usize)>,
    calls: Vec<(String, String, usize)>,
}

fn describe(m: &CModule) -> Result<Description> {
    let mut out: *mut c_char = std::ptr::null_mut();
    // SAFETY: a valid module pointer; `out` receives a malloc'ed string we free below.
    glue(unsafe { ta_module_describe(module_ptr(m), &mut out) })?;
    // SAFETY: on success the glue wrote a malloc'ed string to `out`.
    let text = unsafe { crate::glue::take_string(out) };
    let mut d = Description { modules: Vec::new(), ops: Vec::new(), calls: Vec::new() };
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["M", path, class] => d.modules.push((path.to_string(), class.to_string())),
            ["O", path, op, n] => d.ops.push((path.to_string(), op.to_string(), n.parse().unwrap_or(0))),
            ["C", path, child, n] => {
                d.calls.push((path.to_string(), child.to_string(), n.parse().unwrap_or(0)))
            }
            _ => {}
        }
    }
    Ok(d)
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
pub(super) fn rewrite(
    m: &CModule,
    params: &[(String, Tensor)],
    config: &RewriteConfig,
) -> Result<RewriteReport> {
    crate::args::check_positive("init_alpha", config.init_alpha)?;
    let d = describe(m)?;
    if let Some((path, _)) = d.modules.iter().find(|(_, c)| c.starts_with(QUANTIZER_CLASS)) {
        return Err(ts_error(format!(
            "the model was quantized by this rewrite before ({path} is a quantizer): load the original instead"
        )));
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
        return Err(ts_error("no Linear or Conv2d layer to quantize".into()));
    }
    let names: Vec<&str> = layers.iter().map(|(p, _)| p.as_str()).collect();
    for (i, (name, _)) in config.overrides.iter().enumerate() {
        if !names.contains(&name.as_str()) {
            return Err(ts_error(format!(
                "unknown layer {name:?}: the model's layers are {}",
                names.join(", ")
            )));
        }
        if config.overrides[..i].iter().any(|(n, _)| n == name) {
            return Err(ts_error(format!("layer {name} is given twice: give each layer once")));
        }
    }
    let spec_of =
        |name: &str| config.overrides.iter().find(|(n, _)| n == name).map_or(config.default, |(_, s)| *s);
    let param = |name: &str| params.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
    for (path, class) in &layers {
        // Messages name the layer; a model that is one layer has the empty path.
        let label = if path.is_empty() { "the root module (the model itself)" } else { path.as_str() };
        let spec = spec_of(path);
        check_bitwidth(spec.x_bits)?;
        check_bitwidth(spec.w_bits)?;
        if spec.per_channel && spec.w_kind != QuantizerKind::MinMax {
            return Err(Error::PerChannel(spec.w_kind));
        }
        if spec.x_kind == QuantizerKind::Lsq || spec.w_kind == QuantizerKind::Lsq {
            return Err(ts_error(format!(
                "{label}: the TorchScript rewrite covers pact and minmax, not lsq (yet)"
            )));
        }
        let weight = param(&crate::layers::join(path, "weight"))
            .ok_or_else(|| ts_error(format!("{label}: has no parameter weight")))?;
        let op = if classify(class) == Some(Ok("Linear")) {
            LayerOp::Linear
        } else {
            let mut g = [0i64; 4];
            let p = cstr(path)?;
            // SAFETY: a valid module and path; `g` has the four slots the glue writes.
            glue(unsafe { ta_module_conv_geometry(module_ptr(m), p.as_ptr(), g.as_mut_ptr()) }).map_err(
                |e| {
                    // The glue names a layer by its path, which is empty for the model's root module.
                    match e {
                        Error::TorchScript(msg) if path.is_empty() => ts_error(format!("{label}{msg}")),
                        e => e,
                    }
                },
            )?;
            LayerOp::Conv2d { stride: g[0], padding: g[1], dilation: g[2], groups: g[3] }
        };
        let want = if op == LayerOp::Linear { 2 } else { 4 };
        if weight.dim() != want || !weight.is_floating_point() {
            return Err(ts_error(format!(
                "{label}: weight of shape {:?} is not a {want}-d float tensor",
                weight.size()
            )));
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
                return Err(ts_error(format!(
                    "layers {} and {} share the TorchScript class {} and so one forward: give them the same quantizers and bits",
                    b.name, a.name, a.class
                )));
            }
        }
    }
    for layer in &report.layers {
        let path = cstr(&layer.name)?;
        let device = param(&format!("{}.weight", layer.name)).map(|w| w.device()).unwrap_or(tch::Device::Cpu);
        let mut quantizers = Vec::new();
        if layer.spec.x_kind == QuantizerKind::Pact {
            quantizers.push(("x_quantizer", config.init_alpha));
        }
        if layer.spec.w_kind == QuantizerKind::Pact {
            let w = param(&format!("{}.weight", layer.name)).expect("checked above");
            let range = tch::no_grad(|| w.f_abs()?.f_max()?.f_double_value(&[]))?;
            quantizers.push(("w_quantizer", if range > 0.0 { range } else { 1.0 }));
        }
        for (name, init) in quantizers {
            let alpha = Tensor::f_full([1], init, (Kind::Float, device))?;
            let (n, t) = (cstr(name)?, cstr("PACT")?);
            // SAFETY: valid module, strings and tensor for the duration of the call.
            glue(unsafe {
                ta_module_add_quantizer(module_ptr(m), path.as_ptr(), n.as_ptr(), t.as_ptr(), alpha.as_ptr())
            })?;
        }
    }
    let mut done: Vec<&str> = Vec::new();
    for layer in &report.layers {
        if done.contains(&layer.class.as_str()) {
            continue;
        }
        done.push(&layer.class);
        let (path, source) = (cstr(&layer.name)?, cstr(&forward_source(layer))?);
        // SAFETY: valid module and strings.
        glue(unsafe { ta_module_replace_forward(module_ptr(m), path.as_ptr(), source.as_ptr()) })?;
    }
    Ok(report)
}

/// Sets `calibrating` on each PACT input quantizer of `layers`.
pub(super) fn set_calibrating(m: &CModule, layers: &[RewrittenLayer], on: bool) -> Result<()> {
    for l in layers.iter().filter(|l| l.spec.x_kind == QuantizerKind::Pact) {
        let (p, n) = (cstr(&format!("{}.x_quantizer", l.name))?, cstr("calibrating")?);
        // SAFETY: valid module and strings.
        glue(unsafe { ta_module_set_bool(module_ptr(m), p.as_ptr(), n.as_ptr(), on as i32) })?;
    }
    Ok(())
}

/// A tensor attribute (parameter or buffer) of the submodule at `path`.
pub(super) fn get_tensor(m: &CModule, path: &str, name: &str) -> Result<Tensor> {
    let (p, n) = (cstr(path)?, cstr(name)?);
    let mut out: *mut CTensor = std::ptr::null_mut();
    // SAFETY: valid module and strings; `out` receives a fresh tensor we own.
    glue(unsafe { ta_module_get_tensor(module_ptr(m), p.as_ptr(), n.as_ptr(), &mut out) })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// A float literal TorchScript parses back to the same double.
fn lit(v: f64) -> String {
    format!("{v:?}")
}

/// The TorchScript `forward` of a rewritten layer. It computes what the crate's
/// `ApproxLinear` / `ApproxConv2d` compute in Quantized mode, op for op: integer inputs and
/// weights with straight-through gradients (`detach`), the float op on them, division by
/// both scales, then the bias.
pub(super) fn forward_source(l: &RewrittenLayer) -> String {
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
    let im_x = int_max(s.x_bits) as f64;
    let im_w = int_max(s.w_bits) as f64;
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
