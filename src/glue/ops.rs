//! The crate's TorchScript operators (`ops.cpp`): `torchapprox::lut_linear` and
//! `torchapprox::lut_conv2d` run the table GEMM of a multiplier registered here, so that a
//! rewritten TorchScript layer can compute approximate products.

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

extern "C" {
    fn ta_ops_install(linear: LinearFn, conv: ConvFn) -> *mut c_char;
}

/// The multipliers the operators can name, by index; a multiplier is registered once.
static MULTIPLIERS: Mutex<Vec<Multiplier>> = Mutex::new(Vec::new());

/// The operators' id of `m` (registering it on first use), with the kernels installed.
pub(crate) fn register(m: &Multiplier) -> Result<i64> {
    static INSTALL: Once = Once::new();
    let mut installed = Ok(());
    // SAFETY: two valid function pointers with the signatures ops.cpp declares.
    INSTALL.call_once(|| installed = check(unsafe { ta_ops_install(linear_kernel, conv_kernel) }));
    installed.map_err(Error::TorchScript)?;
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
