//! The crate's TorchScript operators (`ops.cpp`): `torchapprox::lut_linear` and
//! `torchapprox::lut_conv2d` run the table GEMM of a multiplier registered here, so that a
//! rewritten TorchScript layer can compute approximate products; `torchapprox::pact_scaled`
//! and `torchapprox::minmax_scaled` run the quantizers' fused kernels and autograd nodes, and
//! `torchapprox::minmax_weight` MinMax's into a layer's kept buffer.

use std::cell::RefCell;
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
    *const CTensor,
    i64,
    i64,
    i64,
    i64,
    *mut *mut CTensor,
    *mut *mut CTensor,
) -> *mut c_char;

extern "C" {
    fn ta_ops_install(linear: LinearFn, conv: ConvFn, quant: QuantFn) -> *mut c_char;
    fn ta_tensor_unshared(t: *const CTensor) -> i32;
}

thread_local! {
    /// This thread's scratch memory for quantized inputs where no gradient is recorded: a
    /// rewritten model's evaluation quantizes every layer's input into it (each layer's
    /// integers are dead once its op ran), so it holds the largest of them, freed with the
    /// thread. Fresh activation-sized tensors otherwise cost page faults on every call.
    static SCRATCH: RefCell<Tensor> = RefCell::new(Tensor::new());
}

/// Inputs smaller than this many bytes are quantized into fresh tensors: the allocator
/// reuses small blocks without page faults.
const SCRATCH_MIN_BYTES: usize = 1 << 20;

/// Whether no other tensor shares `t`'s memory (false for an undefined `t`).
fn unshared(t: &Tensor) -> bool {
    // SAFETY: a valid tensor handle for the call; the glue catches every exception.
    unsafe { ta_tensor_unshared(t.as_ptr()) != 0 }
}

/// A contiguous tensor of `x`'s shape and dtype on this thread's scratch memory, where the
/// kernels take `x`, `x` is large, and no other tensor still uses the scratch (`None` else).
fn scratch_like(x: &Tensor) -> Option<Tensor> {
    let kind = crate::quantizers::kernels_eligible(x)?;
    let n = x.numel();
    if n * kind.elt_size_in_bytes() < SCRATCH_MIN_BYTES {
        return None;
    }
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        if scratch.defined() && !unshared(&scratch) {
            return None;
        }
        if !scratch.defined() || scratch.kind() != kind || scratch.numel() < n {
            *scratch = Tensor::f_empty([n as i64], (kind, tch::Device::Cpu)).ok()?;
        }
        scratch.f_narrow(0, 0, n as i64).ok()?.f_view(x.size().as_slice()).ok()
    })
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

/// `torchapprox::pact_scaled` (with `alpha`) and `torchapprox::minmax_scaled` /
/// `torchapprox::minmax_weight` (`alpha` null; `into` the latter's buffer where unshared):
/// the crate's quantizers on a TorchScript layer's tensors, one autograd node where a
/// gradient is wanted, as the crate's own layers quantize.
extern "C" fn quant_kernel(
    x: *const CTensor,
    alpha: *const CTensor,
    into: *const CTensor,
    scratch: i64,
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
        // SAFETY: `into` is valid or null likewise; the glue passes it only when unshared.
        let into = (!into.is_null()).then(|| unsafe { Tensor::clone_from_ptr(into as *mut CTensor) });
        let q = quantize(
            &x,
            alpha.as_ref(),
            into.as_ref(),
            scratch != 0,
            int_max,
            rounded != 0,
            per_channel != 0,
        )?;
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

/// The quantizer operators' work: PACT with `alpha`, else MinMax over `x`'s own range, the
/// integers written into `into` where the fused kernels run and it fits, or with `scratch`
/// into this thread's scratch memory where no gradient is recorded.
fn quantize(
    x: &Tensor,
    alpha: Option<&Tensor>,
    into: Option<&Tensor>,
    scratch: bool,
    int_max: i64,
    rounded: bool,
    per_channel: bool,
) -> Result<crate::quantizers::Quantized> {
    use crate::quantizers::{check_defined, grad_enabled, int_max as max_of, MinMaxQuant, QuantConfig};
    check_defined(x, "input")?;
    // Only where the fused kernels will write it: rounded, per tensor.
    let scratch = (scratch && into.is_none() && rounded && !per_channel && !grad_enabled())
        .then(|| scratch_like(x))
        .flatten();
    let into = into.or(scratch.as_ref());
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
            crate::quantizers::pact_quant_scaled_into(x, alpha, int_max, rounded, false, into)
        }
        None => {
            let config = QuantConfig { rounded, per_channel, ..QuantConfig::with_bitwidth(bitwidth) };
            MinMaxQuant::stateless(config)?.f_quantize_scaled_into(x, into)
        }
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::{quantize, unshared};
    use crate::quantizers::pact_quant_scaled;

    // Hostile buffers for `minmax_weight`: a buffer of another shape or dtype, the weight
    // itself or a view of it is never written (the values are fresh, the buffer unchanged);
    // a bad `int_max` is one line naming the value; sharing is seen through views.
    #[test]
    fn bad_buffers_are_left_alone_and_bad_arguments_refused_in_one_line() {
        tch::manual_seed(6);
        let w = Tensor::randn([6, 5], (Kind::Float, Device::Cpu));
        let fresh = quantize(&w, None, None, false, 127, true, false).unwrap().values;
        let before = w.copy();
        for (what, bad) in [
            ("another shape", Tensor::zeros([5, 6], (Kind::Float, Device::Cpu))),
            ("another dtype", Tensor::zeros([6, 5], (Kind::Double, Device::Cpu))),
            ("the weight itself", w.shallow_clone()),
            ("a view of the weight", w.view([6, 5])),
        ] {
            let kept = bad.copy();
            let v = quantize(&w, None, Some(&bad), false, 127, true, false).unwrap().values;
            assert!(v.equal(&fresh), "{what}: the values");
            assert_ne!(v.data_ptr(), bad.data_ptr(), "{what}: not written into");
            assert!(bad.equal(&kept) && w.equal(&before), "{what}: nothing overwritten");
        }
        let err = quantize(&w, None, None, false, 100, true, false).unwrap_err().to_string();
        assert!(err.contains("int_max") && err.contains("100") && !err.contains('\n'), "{err}");
        assert!(!unshared(&Tensor::new()), "an undefined tensor is not a free buffer");
        let view = w.narrow(0, 0, 2);
        assert!(!unshared(&w) && !unshared(&view), "a tensor and its view share memory");
        drop(view);
        assert!(unshared(&w), "alone again");
    }

    // Issue 20: a rewritten model's evaluation quantizes each layer's input into one scratch
    // buffer per thread, reused only once no tensor uses it any more.
    #[test]
    fn no_grad_inputs_share_one_scratch_only_while_nothing_else_holds_it() {
        tch::manual_seed(5);
        let o = (Kind::Float, Device::Cpu);
        let alpha = Tensor::from_slice(&[2.5f32]);
        // 8 MiB and 1 MiB inputs: large enough for the scratch.
        let (big, small) = (Tensor::randn([8, 16, 128, 128], o) * 2.0, Tensor::randn([4, 16, 64, 64], o));
        let fresh = |x: &Tensor| pact_quant_scaled(x, &alpha, 127, true, false).unwrap().values;
        let run = |x: &Tensor| {
            tch::no_grad(|| quantize(x, Some(&alpha), None, true, 127, true, false).unwrap().values)
        };
        let first = run(&big);
        let home = first.data_ptr();
        // While `first` lives, the next call writes elsewhere and `first` keeps its values.
        let second = run(&small);
        assert_ne!(second.data_ptr(), home, "a held scratch is not written");
        assert!(first.equal(&fresh(&big)) && second.equal(&fresh(&small)), "values as fresh ones");
        drop((first, second));
        // Free again: a smaller input takes the start of the same memory.
        let third = run(&small);
        assert_eq!(third.data_ptr(), home, "the free scratch is reused");
        assert!(third.equal(&fresh(&small)));
        drop(third);
        // In grad mode a graph may save the integers (an op whose weight requires grad would):
        // fresh even for an input without a gradient. Nor for a weight's cache (`scratch`
        // false), nor for small inputs.
        let v = quantize(&small, Some(&alpha), None, true, 127, true, false).unwrap().values;
        assert_ne!(v.data_ptr(), home, "in grad mode, fresh");
        let w = tch::no_grad(|| quantize(&small, None, None, false, 127, true, false).unwrap().values);
        assert_ne!(w.data_ptr(), home, "a weight, fresh");
        let tiny = Tensor::randn([10, 10], o);
        assert_ne!(run(&tiny).data_ptr(), home, "small inputs stay out of the scratch");
        drop((v, w));
        let m = tch::no_grad(|| quantize(&small, None, None, true, 127, true, false).unwrap().values);
        assert_eq!(m.data_ptr(), home, "MinMax inputs use it too");
    }
}
