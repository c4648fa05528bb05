//! TorchScript module surgery through `jit.cpp`: what tch's `CModule` does not expose (buffers,
//! a module's description, conv geometry, quantizer submodules, new `forward` methods, tensor
//! attributes, serialization to memory), as safe functions on `&CModule`.

use std::ffi::{c_char, c_void, CString};

use tch::{CModule, Tensor};

use super::{check, take_string, CTensor};
use crate::{Error, Result};

extern "C" {
    fn ta_module_describe(m: *const c_void, out: *mut *mut c_char) -> *mut c_char;
    fn ta_module_forward_ops(m: *const c_void, path: *const c_char, out: *mut *mut c_char) -> *mut c_char;
    fn ta_module_add_quantizer(
        m: *const c_void,
        path: *const c_char,
        name: *const c_char,
        type_name: *const c_char,
        state_name: *const c_char,
        state: *const CTensor,
        is_parameter: i32,
    ) -> *mut c_char;
    fn ta_module_replace_forward(
        m: *const c_void,
        path: *const c_char,
        source: *const c_char,
        methods: *const c_char,
    ) -> *mut c_char;
    fn ta_module_set_bool(
        m: *const c_void,
        path: *const c_char,
        name: *const c_char,
        value: i32,
    ) -> *mut c_char;
    fn ta_module_set_attr(
        m: *const c_void,
        path: *const c_char,
        name: *const c_char,
        tensor: *const CTensor,
        value: i64,
    ) -> *mut c_char;
    fn ta_module_inspect(
        m: *const c_void,
        path: *const c_char,
        names: *const c_char,
        out: *mut *mut c_char,
    ) -> *mut c_char;
    fn ta_module_get_tensor(
        m: *const c_void,
        path: *const c_char,
        name: *const c_char,
        out: *mut *mut CTensor,
    ) -> *mut c_char;
    fn ta_module_clone(m: *const c_void, out: *mut *mut c_void) -> *mut c_char;
    fn ta_module_call_forward(
        m: *const c_void,
        path: *const c_char,
        inputs: *const *const CTensor,
        n: i32,
        data: *mut c_void,
        f: extern "C" fn(*mut c_void, *mut CTensor),
    ) -> *mut c_char;
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

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::TorchScript(format!("{s:?} holds a NUL byte")))
}

/// The glue's error string as the crate's TorchScript error, C++ frames stripped.
fn glue(err: *mut c_char) -> Result<()> {
    check(err).map_err(|msg| Error::TorchScript(crate::strip_backtrace(&msg)))
}

/// Every buffer of the module and its submodules, by dotted name (`bn1.running_mean`).
pub(crate) fn named_buffers(m: &CModule) -> Result<Vec<(String, Tensor)>> {
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

/// The output of the forward of the submodule at `path` on `inputs`: its tensor, or its
/// tuple's items in order (`None` for a `None` item).
pub(crate) fn call_forward(m: &CModule, path: &str, inputs: &[&Tensor]) -> Result<Vec<Option<Tensor>>> {
    extern "C" fn push(data: *mut c_void, t: *mut CTensor) {
        // SAFETY: `data` is the Vec below and `t` null or a new tensor handle whose ownership
        // passes to us, for the duration of this call.
        unsafe {
            let out = &mut *(data as *mut Vec<Option<Tensor>>);
            out.push((!t.is_null()).then(|| Tensor::from_ptr(t)));
        }
    }
    let p = cstr(path)?;
    let ptrs: Vec<*const CTensor> = inputs.iter().map(|t| t.as_ptr()).collect();
    let n = i32::try_from(ptrs.len()).map_err(|_| Error::TorchScript(format!("{} inputs", ptrs.len())))?;
    let mut out: Vec<Option<Tensor>> = Vec::new();
    // SAFETY: a valid module, path and `n` tensor pointers that outlive the call; `push` only
    // runs during it.
    glue(unsafe {
        ta_module_call_forward(
            module_ptr(m),
            p.as_ptr(),
            ptrs.as_ptr(),
            n,
            &mut out as *mut _ as *mut c_void,
            push,
        )
    })?;
    Ok(out)
}

/// A copy of `m` with fresh classes and methods (none of them run yet), sharing its tensors:
/// a rewrite of the copy never reaches `m`, and nothing is serialized.
pub(crate) fn module_clone(m: &CModule) -> Result<CModule> {
    let mut out = std::ptr::null_mut::<c_void>();
    // SAFETY: a valid module pointer; on success `out` holds a `new Module`.
    glue(unsafe { ta_module_clone(module_ptr(m), &mut out) })?;
    // SAFETY: CModule is exactly one pointer to a heap Module (checked above), which its
    // Drop deletes: ownership of `out` passes to it.
    Ok(unsafe { std::mem::transmute::<*mut c_void, CModule>(out) })
}

/// The module's description: lines `M\tpath\ttype`, `O\tpath\top\tcount` (linear and
/// convolution ops in its methods) and `C\tpath\tchild\tcount` (calls into children).
pub(crate) fn describe(m: &CModule) -> Result<String> {
    let mut out: *mut c_char = std::ptr::null_mut();
    // SAFETY: a valid module pointer; `out` receives a malloc'ed string.
    glue(unsafe { ta_module_describe(module_ptr(m), &mut out) })?;
    // SAFETY: on success the glue wrote a malloc'ed string to `out`, which take_string frees.
    Ok(unsafe { take_string(out) })
}

/// Every `aten::` op of the inlined, constant-folded forward of the submodule at `path`, one
/// line each: the op, then its arguments (`i:3`, `f:0.5`, `l:1,2`, `b:0`, `s:same`, `n`, `t`, `?`; the
/// module's own attributes count as constants).
pub(crate) fn forward_ops(m: &CModule, path: &str) -> Result<String> {
    let p = cstr(path)?;
    let mut out: *mut c_char = std::ptr::null_mut();
    // SAFETY: a valid module and path; `out` receives a malloc'ed string.
    glue(unsafe { ta_module_forward_ops(module_ptr(m), p.as_ptr(), &mut out) })?;
    // SAFETY: on success the glue wrote a malloc'ed string to `out`, which take_string frees.
    Ok(unsafe { take_string(out) })
}

/// The one tensor a quantizer submodule holds: a trained parameter (PACT's `alpha`) or a
/// buffer (MinMax's `running_max`).
pub(crate) enum QuantizerState<'a> {
    Parameter(&'a str, &'a Tensor),
    Buffer(&'a str, &'a Tensor),
}

/// Gives the submodule at `path` a quantizer child `name` of the shared class
/// `__torch__.torchapprox.quantizers.<type_name>` holding `state`.
pub(crate) fn add_quantizer(
    m: &CModule,
    path: &str,
    name: &str,
    type_name: &str,
    state: QuantizerState<'_>,
) -> Result<()> {
    let (state_name, tensor, is_parameter) = match state {
        QuantizerState::Parameter(name, t) => (name, t, 1),
        QuantizerState::Buffer(name, t) => (name, t, 0),
    };
    let (p, n, t, s) = (cstr(path)?, cstr(name)?, cstr(type_name)?, cstr(state_name)?);
    // SAFETY: valid module, strings and tensor for the duration of the call.
    glue(unsafe {
        ta_module_add_quantizer(
            module_ptr(m),
            p.as_ptr(),
            n.as_ptr(),
            t.as_ptr(),
            s.as_ptr(),
            tensor.as_ptr(),
            is_parameter,
        )
    })
}

/// Replaces the `forward` of the class of the submodule at `path` by `source` (TorchScript).
pub(crate) fn replace_forward(m: &CModule, path: &str, source: &str) -> Result<()> {
    // Every method the source defines replaces its namesake (a second rewrite, the portable form).
    let names: Vec<&str> =
        source.lines().filter_map(|l| l.strip_prefix("def ").and_then(|d| d.split('(').next())).collect();
    let (p, s, n) = (cstr(path)?, cstr(source)?, cstr(&names.join("\n"))?);
    // SAFETY: valid module and strings.
    glue(unsafe { ta_module_replace_forward(module_ptr(m), p.as_ptr(), s.as_ptr(), n.as_ptr()) })
}

/// Sets the bool attribute `name` of the submodule at `path`.
pub(crate) fn set_bool(m: &CModule, path: &str, name: &str, value: bool) -> Result<()> {
    let (p, n) = (cstr(path)?, cstr(name)?);
    // SAFETY: valid module and strings.
    glue(unsafe { ta_module_set_bool(module_ptr(m), p.as_ptr(), n.as_ptr(), value as i32) })
}

/// The schema of the forward of the submodule at `path` (first line), then `name\tvalue`
/// for each of `names` (values as [`forward_ops`] renders them, `?` where absent).
pub(crate) fn inspect(m: &CModule, path: &str, names: &[&str]) -> Result<String> {
    let (p, n) = (cstr(path)?, cstr(&names.join("\n"))?);
    let mut out: *mut c_char = std::ptr::null_mut();
    // SAFETY: a valid module and strings; `out` receives a malloc'ed string.
    glue(unsafe { ta_module_inspect(module_ptr(m), p.as_ptr(), n.as_ptr(), &mut out) })?;
    // SAFETY: on success the glue wrote a malloc'ed string to `out`, which take_string frees.
    Ok(unsafe { take_string(out) })
}

/// A plain attribute's value (neither parameter nor buffer: `state_dict` never lists it).
pub(crate) enum AttrValue<'a> {
    Tensor(&'a Tensor),
    Int(i64),
}

/// Sets the plain attribute `name` of the submodule at `path`, declaring it on first use.
pub(crate) fn set_attr(m: &CModule, path: &str, name: &str, value: AttrValue<'_>) -> Result<()> {
    let (p, n) = (cstr(path)?, cstr(name)?);
    let (tensor, int) = match value {
        AttrValue::Tensor(t) => (t.as_ptr(), 0),
        AttrValue::Int(v) => (std::ptr::null(), v),
    };
    // SAFETY: valid module and strings; `tensor` is null or a live tensor for the call.
    glue(unsafe { ta_module_set_attr(module_ptr(m), p.as_ptr(), n.as_ptr(), tensor, int) })
}

/// A tensor attribute (parameter or buffer) of the submodule at `path`, sharing its storage.
pub(crate) fn get_tensor(m: &CModule, path: &str, name: &str) -> Result<Tensor> {
    let (p, n) = (cstr(path)?, cstr(name)?);
    let mut out: *mut CTensor = std::ptr::null_mut();
    // SAFETY: valid module and strings; `out` receives a fresh tensor handle.
    glue(unsafe { ta_module_get_tensor(module_ptr(m), p.as_ptr(), n.as_ptr(), &mut out) })?;
    // SAFETY: on success `out` is a new tensor handle whose ownership passes to us.
    Ok(unsafe { Tensor::from_ptr(out) })
}
