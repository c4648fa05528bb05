//! Fused CPU kernels: each quantizer in one or two passes over contiguous memory,
//! bit for bit the same arithmetic as the libtorch path (which stays the reference
//! and the path for CUDA, other layouts, half precision and non-finite inputs).
//!
//! `real` holds the element types and their rounding; this file the one driver every
//! elementwise quantizer runs through (eligibility, buffers, parallel chunks, saturation);
//! `minmax` and `pact` only their loops and parameters.

use tch::{Device, Kind, Tensor};

#[macro_use]
mod real;

/// Runs the `T = f32` or `T = f64` instance of a kernel for a dtype from [`eligible`], so
/// that no caller can pair a buffer with the wrong element type.
macro_rules! by_kind {
    ($kind:expr, $f:ident($($arg:expr),*)) => {
        if $kind == Kind::Double { $f::<f64>($($arg),*) } else { $f::<f32>($($arg),*) }
    };
}

mod minmax;
mod pact;

pub(crate) use minmax::{minmax, minmax_to, MinMaxOut};
pub(crate) use pact::{pact, pact_backward, pact_sign, pact_to};
use real::clamp;
pub(crate) use real::Real;

/// Elements below which one thread does all the work (thread start-up costs more).
const PARALLEL_MIN: usize = 1 << 18;

/// `max |x|` and whether every element is finite, in one pass; `kind` from [`eligible`].
pub(crate) fn abs_max(x: &Tensor, kind: Kind) -> (f64, bool) {
    by_kind!(kind, abs_max_typed(x))
}

/// An upstream gradient: contiguous of the input's shape and dtype, or one value broadcast
/// (what `sum()` sends back), which the kernels read without materialising it.
#[derive(Clone, Copy)]
pub(crate) enum Grad<'a> {
    Tensor(&'a Tensor),
    Scalar(f64),
}

impl<'a> Grad<'a> {
    /// `g` as a kernel reads it, or `None` where it must go through libtorch (other dtype,
    /// device or layout than `x`).
    pub(crate) fn of(g: &'a Tensor, x: &Tensor) -> Option<Self> {
        if g.device() != Device::Cpu || g.kind() != x.kind() || g.size() != x.size() {
            return None;
        }
        if g.numel() > 0 && g.stride().iter().all(|&s| s == 0) {
            // SAFETY: a CPU tensor of the dtype matched, with at least one element.
            let v = match g.kind() {
                Kind::Float => unsafe { *(g.data_ptr() as *const f32) as f64 },
                Kind::Double => unsafe { *(g.data_ptr() as *const f64) },
                _ => return None,
            };
            return Some(Self::Scalar(v));
        }
        g.is_contiguous().then_some(Self::Tensor(g))
    }
}

/// Whether `x` can take a kernel: CPU, contiguous, float32 or float64, not empty.
pub(crate) fn eligible(x: &Tensor) -> Option<Kind> {
    let kind = x.kind();
    let ok = x.device() == Device::Cpu
        && matches!(kind, Kind::Float | Kind::Double)
        && x.numel() > 0
        && x.is_contiguous();
    ok.then_some(kind)
}

/// Whether `dst` can receive a kernel's output for `x`: same shape and dtype, contiguous, CPU, no grad.
pub(crate) fn fits(dst: &Tensor, x: &Tensor) -> bool {
    dst.device() == Device::Cpu
        && dst.kind() == x.kind()
        && dst.size() == x.size()
        && dst.is_contiguous()
        && !dst.requires_grad()
}

/// Whether a kernel may write its output for `x` into `dst`: [`fits`], and no memory shared
/// with `x` (the kernel would read what it writes).
pub(crate) fn writable(dst: &Tensor, x: &Tensor) -> bool {
    fits(dst, x) && !super::memory_overlaps(x, dst)
}

/// The elements of a contiguous CPU tensor of element type `T`.
///
/// SAFETY: the caller checked [`eligible`] with `T::KIND`; the slice lives while `x` does.
unsafe fn slice<T: Real>(x: &Tensor) -> &[T] {
    std::slice::from_raw_parts(x.data_ptr() as *const T, x.numel())
}

/// The elements of `dst` for writing.
///
/// SAFETY: the caller checked [`fits`] against an eligible `x` of type `T`, and holds `dst`
/// mutably, so nothing else reads or writes it meanwhile.
unsafe fn slice_mut<T: Real>(dst: &mut Tensor) -> &mut [T] {
    std::slice::from_raw_parts_mut(dst.data_ptr() as *mut T, dst.numel())
}

/// A fresh contiguous tensor shaped like `x` (dtype `T`), whose elements `fill` writes; the
/// slice lives only as long as the call, while the tensor that owns it is alive.
fn fill_new<T: Real>(x: &Tensor, fill: impl FnOnce(&mut [T])) -> Tensor {
    let mut t = Tensor::empty(x.size(), (T::KIND, Device::Cpu));
    // SAFETY: a new, contiguous, uniquely owned CPU buffer of numel elements of type T,
    // borrowed mutably (through `t`) for the duration of `fill` only.
    fill(unsafe { slice_mut::<T>(&mut t) });
    t
}

/// One elementwise quantizer pass over element type `T`: its parameters, converted once,
/// and the loop over one chunk. Every elementwise kernel runs through [`run_new`] and [`run_to`].
pub(crate) trait Pass<T: Real>: Copy + Send + Sync {
    /// Writes the pass's values of `xs` into `ys` (same length).
    fn run(self, xs: &[T], ys: &mut [T]);
    /// `(int_max, scale)` of a dequantizing pass, whose outputs [`saturate`] bounds; `None` for integers.
    fn dequantized(self) -> Option<(f64, T)>;
}

/// `p` over an eligible `x`, into a new tensor.
fn run_new<T: Real, P: Pass<T>>(x: &Tensor, p: P) -> Tensor {
    fill_new(x, |ys| run_into(x, ys, p))
}

/// `p` over an eligible `x`, into `dst`.
///
/// SAFETY: the caller checked [`fits`]`(dst, x)` and that `T` is `x`'s element type.
unsafe fn run_to<T: Real, P: Pass<T>>(x: &Tensor, dst: &mut Tensor, p: P) {
    run_into(x, slice_mut::<T>(dst), p)
}

fn run_into<T: Real, P: Pass<T>>(x: &Tensor, ys: &mut [T], p: P) {
    // SAFETY: the callers checked eligible(), and by_kind! chose T from that dtype.
    let xs = unsafe { slice::<T>(x) };
    for_chunks(xs, [&mut *ys], move |xs, [ys]| p.run(xs, ys));
    if let Some((int_max, s)) = p.dequantized() {
        saturate(ys, int_max, s);
    }
}

/// Whether `int_max / s` may overflow `T` (a range near the dtype's largest value with few bits,
/// whose scale is subnormal), so that dequantized values must be saturated.
pub(crate) fn may_overflow(int_max: f64, s: f64, max: f64) -> bool {
    int_max / s > 0.5 * max
}

/// Saturates dequantized values to `T`'s finite range where [`may_overflow`] (NaN stays NaN):
/// a finite input never dequantizes to ±inf.
fn saturate<T: Real>(ys: &mut [T], int_max: f64, s: T) {
    if may_overflow(int_max, s.to_f64(), T::MAX.to_f64()) {
        let neg = T::ZERO - T::MAX;
        for y in ys {
            *y = clamp(*y, neg, T::MAX);
        }
    }
}

/// Runs `f` over matching chunks of `src` and each of `dst` on libtorch's intra-op threads.
fn for_chunks<T: Real, const N: usize>(
    src: &[T],
    dst: [&mut [T]; N],
    f: impl Fn(&[T], [&mut [T]; N]) + Sync,
) {
    let n = src.len();
    assert!(dst.iter().all(|d| d.len() == n));
    let bases: [usize; N] = std::array::from_fn(|k| dst[k].as_ptr() as usize);
    crate::glue::parallel_for(n, PARALLEL_MIN / 2, |b, e| {
        // SAFETY: parallel_for hands out disjoint ranges of 0..n, and `dst` is borrowed
        // mutably for the whole call, so each chunk is written by one thread only.
        let parts: [&mut [T]; N] = std::array::from_fn(|k| unsafe {
            std::slice::from_raw_parts_mut((bases[k] as *mut T).add(b), e - b)
        });
        f(&src[b..e], parts)
    });
}

/// Like [`for_chunks`] with one output, summing what `f(offset, src, dst)` returns for each chunk.
fn for_chunks_reduce<T: Real>(
    src: &[T],
    dst: &mut [T],
    f: impl Fn(usize, &[T], &mut [T]) -> f64 + Sync,
) -> f64 {
    let n = src.len();
    assert_eq!(dst.len(), n);
    let base = dst.as_mut_ptr() as usize;
    let total = std::sync::Mutex::new(0.0f64);
    crate::glue::parallel_for(n, PARALLEL_MIN / 2, |b, e| {
        // SAFETY: as in for_chunks.
        let part = unsafe { std::slice::from_raw_parts_mut((base as *mut T).add(b), e - b) };
        let s = f(b, &src[b..e], part);
        *total.lock().unwrap_or_else(|p| p.into_inner()) += s;
    });
    total.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// [`abs_max`] for element type `T`.
fn abs_max_typed<T: Real>(x: &Tensor) -> (f64, bool) {
    // SAFETY: the caller checked eligible(), and by_kind! chose T from that dtype.
    let xs = unsafe { slice::<T>(x) };
    let reduce = T::abs_max_slice;
    let parts = std::sync::Mutex::new((0.0f64, true));
    crate::glue::parallel_for(xs.len(), PARALLEL_MIN / 2, |b, e| {
        let (m, f) = reduce(&xs[b..e]);
        let mut p = parts.lock().unwrap_or_else(|p| p.into_inner());
        *p = (p.0.max(m), p.1 && f);
    });
    parts.into_inner().unwrap_or_else(|p| p.into_inner())
}
