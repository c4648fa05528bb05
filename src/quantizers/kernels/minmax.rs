//! MinMax's elementwise pass: `round(clamp(x, -m, m) * s)`, over `s` if dequantized.

use tch::{Kind, Tensor};

use super::real::{clamp, round_even, Real};
use super::{fits, run_new, run_to, Pass};

/// What a MinMax kernel writes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MinMaxOut {
    /// `round(clamp(x, -m, m) * s)`.
    Integers,
    /// `round(clamp(x, -m, m) * s) / s`.
    Dequantized,
}

/// One MinMax pass over a finite `x` with range `m` and scale `s`, into a new tensor.
pub(crate) fn minmax(x: &Tensor, kind: Kind, m: f64, s: f64, out: MinMaxOut) -> Tensor {
    by_kind!(kind, minmax_typed(x, m, s, out))
}

/// Like [`minmax`], into `dst`, which must [`fits`] `x`.
pub(crate) fn minmax_to(x: &Tensor, kind: Kind, dst: &mut Tensor, m: f64, s: f64, out: MinMaxOut) {
    debug_assert!(fits(dst, x));
    by_kind!(kind, minmax_to_typed(x, dst, m, s, out))
}

/// MinMax's parameters in `T`.
#[derive(Clone, Copy)]
struct MinMaxPass<T> {
    neg: T,
    m: T,
    s: T,
    dequantize: bool,
}

impl<T: Real> MinMaxPass<T> {
    fn new(m: f64, s: f64, out: MinMaxOut) -> Self {
        let (m, s) = (T::from_f64(m), T::from_f64(s));
        Self { neg: T::ZERO - m, m, s, dequantize: out == MinMaxOut::Dequantized }
    }
}

impl<T: Real> Pass<T> for MinMaxPass<T> {
    fn run(self, xs: &[T], ys: &mut [T]) {
        minmax_slice(xs, ys, self.neg, self.m, self.s, self.dequantize)
    }

    fn dequantized(self) -> Option<(f64, T)> {
        self.dequantize.then(|| ((self.m * self.s).to_f64(), self.s))
    }
}

/// [`minmax`] for element type `T`.
fn minmax_typed<T: Real>(x: &Tensor, m: f64, s: f64, out: MinMaxOut) -> Tensor {
    run_new(x, MinMaxPass::<T>::new(m, s, out))
}

/// [`minmax_to`] for element type `T`.
fn minmax_to_typed<T: Real>(x: &Tensor, dst: &mut Tensor, m: f64, s: f64, out: MinMaxOut) {
    // SAFETY: the caller checked fits(dst, x); by_kind! chose T from x's dtype.
    unsafe { run_to(x, dst, MinMaxPass::<T>::new(m, s, out)) }
}

simd!(fn minmax_slice<T: Real>(xs: &[T], ys: &mut [T], neg: T, m: T, s: T, dequantize: bool) = minmax_body);

#[inline(always)]
fn minmax_body<T: Real>(xs: &[T], ys: &mut [T], neg: T, m: T, s: T, dequantize: bool) {
    if dequantize {
        for (y, &v) in ys.iter_mut().zip(xs) {
            *y = round_even(clamp(v, neg, m) * s) / s;
        }
    } else {
        for (y, &v) in ys.iter_mut().zip(xs) {
            *y = round_even(clamp(v, neg, m) * s);
        }
    }
}
