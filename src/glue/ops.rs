//! The crate's TorchScript operators (`ops.cpp`): `torchapprox::lut_linear` and
//! `torchapprox::lut_conv2d` run the table GEMM of a multiplier registered here, so that a
//! rewritten TorchScript layer can compute approximate products; `torchapprox::pact_scaled`
//! and `torchapprox::minmax_scaled` run the quantizers' fused kernels and autograd nodes.

use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, Once};

use tch::Tensor;

use super::{c_error, check, CTensor};
use crate::approx::{lut_conv2d_with, lut_linear, Conv2dGeometry, Multiplier};
use crate::{Error, Result};

type LinearFn = extern "C" fn(*const CTensor, *const CTensor, i64, *mut *mut CTensor) -> *mut c_char;
type ConvFn =
    extern "C" fn(*const CTensor, *const CTensor, i64, *const i64, *mut *mut CTensor) -> *mut c_char;
type QuantFn = extern "C" fn(
    *const CTensor,
    *const CTensor,
    i64,
    i64,
    i64,
    *mut *mut CTensor,
    *mut *mut CTensor,
) -> *mut c_char;

extern "C" {
    fn ta_ops_install(linear: LinearFn, conv: ConvFn, quant: QuantFn) -> *mut c_char;
}

/// The multipliers the operators can name, by index; a multiplier is registered once.
static MULTIPLIERS: Mutex<Vec<Multiplier>> = Mutex::new(Vec::new());

/// Installs the operators' Rust kernels (once per process; later calls return at once).
pub(crate) fn install() -> Result<()> {
    static INSTALL: Once = Once::new();
    let mut installed = Ok(());
    // SAFETY: valid function pointers with the signatures ops.cpp declares.
    INSTALL
        .call_once(|| installed = check(unsafe { ta_ops_install(linear_kernel, conv_kernel, quant_kernel) }));
    installed.map_err(Error::TorchScript)
}

/// The operators' id of `m` (registering it on first use), with the kernels installed.
pub(crate) fn register(m: &Multiplier) -> Result<i64> {
    install()?;
    let mut all = MULTIPLIERS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = all.iter().position(|k| k.name() == m.name() && k.table() == m.table()) {
        return Ok(i as i64);
    }
    all.push(m.clone());
    Ok(all.len() as i64 - 1)
}

fn multiplier(id: i64) -> std::result::Result<Multiplier, String> {
    let all = MULTIPLIERS.lock().unwrap_or_else(|p| p.into_inner());
    usize::try_from(id).ok().and_then(|i| all.get(i).cloned()).ok_or_else(|| {
        format!("no multiplier {id} is registered in this process (set the layer's multiplier again)")
    })
}

/// Runs `f` for the glue: its tensor into `out`, or an error string (panics included).
fn kernel(out: *mut *mut CTensor, f: impl FnOnce() -> Result<Tensor>) -> *mut c_char {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(mut t)) => {
            // SAFETY: `out` is the glue's slot; it deletes the pointer it receives.
            unsafe { *out = t.as_mut_ptr() };
            std::mem::forget(t);
            std::ptr::null_mut()
        }
        Ok(Err(e)) => c_error(&e.to_string()),
        Err(panic) => c_error(
            &crate::error::panic_message(&*panic).unwrap_or_else(|| "panic in a torchapprox operator".into()),
        ),
    }
}

extern "C" fn linear_kernel(
    x: *const CTensor,
    w: *const CTensor,
    id: i64,
    out: *mut *mut CTensor,
) -> *mut c_char {
    kernel(out, || {
        let m = multiplier(id).map_err(Error::TorchScript)?;
        // SAFETY: the glue passes two valid tensors for the duration of the call.
        let (x, w) =
            unsafe { (Tensor::clone_from_ptr(x as *mut CTensor), Tensor::clone_from_ptr(w as *mut CTensor)) };
        // In the input's dtype, as the exact op's result would be (the kernel sums in float32).
        lut_linear(&x, &w, &m)?.f_to_kind(x.kind()).map_err(Into::into)
    })
}

extern "C" fn conv_kernel(
    x: *const CTensor,
    w: *const CTensor,
    id: i64,
    geometry: *const i64,
    out: *mut *mut CTensor,
) -> *mut c_char {
    kernel(out, || {
        let m = multiplier(id).map_err(Error::TorchScript)?;
        // SAFETY: valid tensors, and `geometry` holds 7 integers, for the duration of the call.
        let (x, w, g) = unsafe {
            (
                Tensor::clone_from_ptr(x as *mut CTensor),
                Tensor::clone_from_ptr(w as *mut CTensor),
                std::slice::from_raw_parts(geometry, 7),
            )
        };
        let geometry = Conv2dGeometry {
            stride: [g[0], g[1]],
            padding: [g[2], g[3]],
            dilation: [g[4], g[5]],
            groups: g[6],
        };
        lut_conv2d_with(&x, &w, &m, geometry)?.f_to_kind(x.kind()).map_err(Into::into)
    })
}

/// `torchapprox::pact_scaled` (with `alpha`) and `torchapprox::minmax_scaled` (`alpha` null):
/// the crate's quantizers on a TorchScript layer's tensors, one autograd node where a
/// gradient is wanted, as the crate's own layers quantize.
extern "C" fn quant_kernel(
    x: *const CTensor,
    alpha: *const CTensor,
    int_max: i64,
    rounded: i64,
    per_channel: i64,
    values: *mut *mut CTensor,
    scale: *mut *mut CTensor,
) -> *mut c_char {
    let mut scale_out = None;
    let err = kernel(values, || {
        // SAFETY: the glue passes a valid `x`, and `alpha` valid or null, for the call.
        let x = unsafe { Tensor::clone_from_ptr(x as *mut CTensor) };
        let alpha = (!alpha.is_null()).then(|| unsafe { Tensor::clone_from_ptr(alpha as *mut CTensor) });
        let q = quantize(&x, alpha.as_ref(), int_max, rounded != 0, per_channel != 0)?;
        scale_out = Some(q.scale);
        Ok(q.values)
    });
    if err.is_null() {
        if let Some(mut s) = scale_out {
            // SAFETY: `scale` is the glue's slot; it deletes the pointer it receives.
            unsafe { *scale = s.as_mut_ptr() };
            std::mem::forget(s);
        }
    }
    err
}

fn quantize(
    x: &Tensor,
    alpha: Option<&Tensor>,
    int_max: i64,
    rounded: bool,
    per_channel: bool,
) -> Result<crate::quantizers::Quantized> {
    use crate::quantizers::{check_defined, int_max as max_of, ApproxQuantizer, MinMaxQuant, QuantConfig};
    check_defined(x, "input")?;
    let bitwidth = (2..=16).find(|&b| max_of(b) == int_max).ok_or(Error::Argument {
        what: "int_max",
        value: int_max as f64,
        expected: "2^(bitwidth-1) - 1 for a bitwidth in 2..=16",
    })?;
    match alpha {
        Some(alpha) => {
            if alpha.device() != x.device() {
                return Err(Error::Device { input: x.device(), state: alpha.device(), what: "PACT alpha" });
            }
            crate::quantizers::pact_quant_scaled(x, alpha, int_max, rounded, false)
        }
        None => {
            let config = QuantConfig { rounded, per_channel, ..QuantConfig::with_bitwidth(bitwidth) };
            MinMaxQuant::stateless(config)?.f_quantize_scaled(x)
        }
    }
}
