//! Safe Rust over the C++ glue, by topic: custom autograd nodes ([`autograd`]), libtorch's
//! intra-op thread pool ([`parallel`]) and TorchScript module surgery ([`jit`]). This file
//! holds the border they share: errors come back as malloc'ed strings, freed here.
//!
//! Every `extern "C"` declaration of the crate is in this folder, next to the C++ file
//! (`*.cpp`, with `border.h`) that defines it; decisions stay in Rust.

use std::ffi::{c_char, c_void, CStr};

pub(crate) mod autograd;
pub(crate) mod distributed;
pub(crate) mod jit;
pub(crate) mod ops;
pub(crate) mod parallel;

pub(crate) use autograd::apply;
pub(crate) use parallel::parallel_for;

/// libtorch's tensor handle as tch passes it.
pub(crate) type CTensor = torch_sys::C_tensor;

extern "C" {
    fn ta_free(p: *mut c_char);
    fn malloc(n: usize) -> *mut c_void;
}

/// Turns an error string from the glue into a `Result`, freeing it.
pub(crate) fn check(err: *mut c_char) -> std::result::Result<(), String> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null string malloc'ed by the glue.
    Err(unsafe { take_string(err) })
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
pub(crate) fn c_error(msg: &str) -> *mut c_char {
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
