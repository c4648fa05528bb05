//! libtorch's intra-op thread pool for the crate's Rust kernels (`parallel.cpp`).

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::check;

extern "C" {
    fn ta_parallel_for(
        n: i64,
        grain: i64,
        body: extern "C" fn(*mut c_void, i64, i64),
        data: *mut c_void,
    ) -> *mut c_char;
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
