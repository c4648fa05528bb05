//! Safe Rust over the C++ glue (`glue.cpp`): custom autograd nodes with Rust forward and
//! backward, and libtorch's intra-op thread pool for Rust kernels.

use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

use crate::{Error, Result};

type CTensor = torch_sys::C_tensor;

extern "C" {
    fn ta_free(p: *mut c_char);
    fn ta_function_apply(
        fwd: *mut c_void,
        bwd: *mut c_void,
        params: *const c_void,
        params_len: usize,
        inputs: *const *const CTensor,
        n_inputs: i64,
        outputs: *mut *mut CTensor,
        n_outputs: *mut i64,
    ) -> *mut c_char;
    fn ta_parallel_for(
        n: i64,
        grain: i64,
        body: extern "C" fn(*mut c_void, i64, i64),
        data: *mut c_void,
    ) -> *mut c_char;
    fn malloc(n: usize) -> *mut c_void;
}

/// Most outputs, saved tensors or inputs a node has (the glue's fixed arrays).
const MAX: usize = 8;

/// Turns an error string from the glue into a `Result`, freeing it.
pub(crate) fn check(err: *mut c_char) -> std::result::Result<(), String> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null string malloc'ed by the glue.
    Err(unsafe { take_string(err) })
}

/// Frees memory the glue malloc'ed.
///
/// SAFETY: `p` came from the glue's malloc and is not used afterwards.
pub(crate) unsafe fn free(p: *mut c_char) {
    ta_free(p);
}

/// The text of a NUL-terminated string malloc'ed by the glue, which is freed.
///
/// SAFETY: `p` is such a string, not null, and not used afterwards.
pub(crate) unsafe fn take_string(p: *mut c_char) -> String {
    let text = CStr::from_ptr(p).to_string_lossy().into_owned();
    ta_free(p);
    text
}

/// A message in malloc'ed memory, which the glue frees with `free`.
fn c_error(msg: &str) -> *mut c_char {
    let bytes = msg.as_bytes();
    // SAFETY: a fresh allocation of len + 1 bytes, filled and NUL-terminated.
    unsafe {
        let p = malloc(bytes.len() + 1) as *mut u8;
        if !p.is_null() {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
            *p.add(bytes.len()) = 0;
        }
        p as *mut c_char
    }
}

/// A node's forward: its outputs and the tensors its backward needs.
pub(crate) type Forward<P> = fn(&P, &[Tensor]) -> Result<(Vec<Tensor>, Vec<Tensor>)>;
/// A node's backward: from the saved tensors, the outputs' gradients and which inputs want
/// one, a gradient per input (`None` for none).
pub(crate) type Backward<P> = fn(&P, &[Tensor], &[Tensor], &[bool]) -> Result<Vec<Option<Tensor>>>;

/// What the node carries: the two functions and their parameters, copied as bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct Packet<P: Copy> {
    fwd: Forward<P>,
    bwd: Backward<P>,
    params: P,
}

/// Borrowed tensor pointers from the glue as owned handles (shallow clones).
///
/// SAFETY: `ptrs` holds `n` valid tensor pointers.
unsafe fn handles(ptrs: *const *mut CTensor, n: i64) -> Vec<Tensor> {
    (0..n as usize).map(|i| Tensor::clone_from_ptr(*ptrs.add(i))).collect()
}

/// Hands `tensors` over to the glue, which takes ownership.
fn hand_over(tensors: Vec<Tensor>, out: *mut *mut CTensor) -> std::result::Result<(), String> {
    if tensors.len() > MAX {
        return Err(format!("a node returned {} tensors, at most {MAX} are supported", tensors.len()));
    }
    for (i, mut t) in tensors.into_iter().enumerate() {
        // SAFETY: `out` has MAX slots; the glue deletes each pointer it receives.
        unsafe { *out.add(i) = t.as_mut_ptr() };
        std::mem::forget(t);
    }
    Ok(())
}

fn run_callback(f: impl FnOnce() -> std::result::Result<(), String>) -> *mut c_char {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(msg)) => c_error(&msg),
        Err(panic) => {
            let msg = crate::error::panic_message(&*panic)
                .unwrap_or_else(|| "panic in a Rust autograd callback".into());
            c_error(&msg)
        }
    }
}

extern "C" fn forward_trampoline<P: Copy>(
    params: *const c_void,
    inputs: *const *mut CTensor,
    n_inputs: i64,
    outputs: *mut *mut CTensor,
    saved: *mut *mut CTensor,
) -> *mut c_char {
    run_callback(|| {
        // SAFETY: the bytes of a Packet<P> written by `apply`; possibly unaligned in the node.
        let packet = unsafe { std::ptr::read_unaligned(params as *const Packet<P>) };
        let inputs = unsafe { handles(inputs, n_inputs) };
        let (outs, keep) = (packet.fwd)(&packet.params, &inputs).map_err(|e| e.to_string())?;
        hand_over(outs, outputs)?;
        hand_over(keep, saved)
    })
}

extern "C" fn backward_trampoline<P: Copy>(
    params: *const c_void,
    saved: *const *mut CTensor,
    n_saved: i64,
    grads: *const *mut CTensor,
    n_grads: i64,
    needs: *const u8,
    grad_inputs: *mut *mut CTensor,
) -> *mut c_char {
    run_callback(|| {
        // SAFETY: as in forward_trampoline; the glue passes valid saved and gradient tensors.
        let packet = unsafe { std::ptr::read_unaligned(params as *const Packet<P>) };
        let (saved, grads) = unsafe { (handles(saved, n_saved), handles(grads, n_grads)) };
        // The glue passes one flag per input; the node's functions know how many inputs they have.
        let needs: Vec<bool> = (0..MAX).map(|i| unsafe { *needs.add(i) } != 0).collect();
        let result = (packet.bwd)(&packet.params, &saved, &grads, &needs).map_err(|e| e.to_string())?;
        if result.len() > MAX {
            return Err(format!("a node returned {} gradients, at most {MAX} are supported", result.len()));
        }
        for (i, g) in result.into_iter().enumerate() {
            if let Some(mut g) = g {
                // SAFETY: one slot per input, allocated by the glue, which takes ownership.
                unsafe { *grad_inputs.add(i) = g.as_mut_ptr() };
                std::mem::forget(g);
            }
        }
        Ok(())
    })
}

/// Runs `fwd` on `inputs` as one autograd node whose backward is `bwd`.
///
/// Where no input requires a gradient (or grad mode is off) no node is recorded and the
/// outputs are `fwd`'s as they are. `fwd` runs with grad mode off.
pub(crate) fn apply<P: Copy + 'static>(
    params: P,
    inputs: &[&Tensor],
    fwd: Forward<P>,
    bwd: Backward<P>,
) -> Result<Vec<Tensor>> {
    if inputs.len() > MAX {
        return Err(Error::Argument {
            what: "node inputs",
            value: inputs.len() as f64,
            expected: "at most 8",
        });
    }
    let packet = Packet { fwd, bwd, params };
    let ptrs: Vec<*const CTensor> = inputs.iter().map(|t| t.as_ptr()).collect();
    let mut outs = [std::ptr::null_mut::<CTensor>(); MAX];
    let mut n_out = 0i64;
    // SAFETY: the packet is plain data read back with read_unaligned; the tensor pointers
    // are valid for the call; the glue writes at most MAX outputs, each owned by us after.
    let err = unsafe {
        ta_function_apply(
            forward_trampoline::<P> as *mut c_void,
            backward_trampoline::<P> as *mut c_void,
            &packet as *const Packet<P> as *const c_void,
            std::mem::size_of::<Packet<P>>(),
            ptrs.as_ptr(),
            ptrs.len() as i64,
            outs.as_mut_ptr(),
            &mut n_out,
        )
    };
    check(err).map_err(|msg| Error::Torch(tch::TchError::Torch(msg)))?;
    // SAFETY: n_out tensors, each a fresh `new at::Tensor` that we now own.
    Ok((0..n_out as usize).map(|i| unsafe { Tensor::from_ptr(outs[i]) }).collect())
}

/// Calls `body(begin, end)` over `0..n` in chunks of at least `grain` on libtorch's intra-op threads.
pub(crate) fn parallel_for(n: usize, grain: usize, body: impl Fn(usize, usize) + Sync) {
    if n <= grain || tch::get_num_threads() <= 1 {
        body(0, n);
        return;
    }
    struct Data<'a> {
        body: &'a (dyn Fn(usize, usize) + Sync),
        panicked: std::sync::atomic::AtomicBool,
    }
    extern "C" fn call(data: *mut c_void, b: i64, e: i64) {
        // SAFETY: `data` is the Data below, alive for the whole parallel_for.
        let d = unsafe { &*(data as *const Data) };
        if catch_unwind(AssertUnwindSafe(|| (d.body)(b as usize, e as usize))).is_err() {
            d.panicked.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let data = Data { body: &body, panicked: false.into() };
    // SAFETY: `call` only reads `data`, which outlives the call.
    let err = unsafe { ta_parallel_for(n as i64, grain as i64, call, &data as *const Data as *mut c_void) };
    if let Err(msg) = check(err) {
        panic!("parallel_for: {msg}");
    }
    assert!(!data.panicked.into_inner(), "a parallel kernel panicked");
}
