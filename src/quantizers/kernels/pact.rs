//! PACT's elementwise pass (`round(clamp(x * s, -int_max, int_max))`, over `s` if
//! dequantized) and its backward pass with the alpha gradient's sum.

use tch::{Kind, Tensor};

use super::real::{clamp, round_even, Real};
use super::{fill_new, fits, for_chunks_reduce, run_new, run_to, slice, Grad, Pass, PARALLEL_MIN};

/// One PACT pass: integers `round(clamp(x * s, -im, im))`, or those divided by `s`, into a new tensor.
pub(crate) fn pact(x: &Tensor, kind: Kind, s: f64, int_max: i64, dequantize: bool) -> Tensor {
    by_kind!(kind, pact_typed(x, s, int_max, dequantize))
}

/// Like [`pact`], into `dst`, which must [`fits`] `x`.
pub(crate) fn pact_to(x: &Tensor, kind: Kind, dst: &mut Tensor, s: f64, int_max: i64, dequantize: bool) {
    debug_assert!(fits(dst, x));
    by_kind!(kind, pact_to_typed(x, dst, s, int_max, dequantize))
}

/// PACT's backward pass (see [`pact_backward_typed`]).
pub(crate) fn pact_backward(
    x: &Tensor,
    kind: Kind,
    g: Grad,
    alpha: f64,
    gx_scale: f64,
    want_gx: bool,
) -> (Option<Tensor>, f64) {
    by_kind!(kind, pact_backward_typed(x, g, alpha, gx_scale, want_gx))
}

/// PACT's derivative of the integer output with respect to alpha (see
/// `PACTQuant::f_alpha_tangent`): `s` where `x >= alpha`, `-s` where `x <= -alpha`, 0
/// elsewhere (and at NaN), into a new tensor; the same values as `(upper - lower) * s`.
pub(crate) fn pact_sign(x: &Tensor, kind: Kind, alpha: f64, s: f64) -> Tensor {
    by_kind!(kind, pact_sign_typed(x, alpha, s))
}

fn pact_sign_typed<T: Real>(x: &Tensor, alpha: f64, s: f64) -> Tensor {
    run_new(x, SignPass { a: T::from_f64(alpha), s: T::from_f64(s) })
}

#[derive(Clone, Copy)]
struct SignPass<T> {
    a: T,
    s: T,
}

impl<T: Real> Pass<T> for SignPass<T> {
    fn run(self, xs: &[T], ys: &mut [T]) {
        sign_slice(xs, ys, self.a, self.s)
    }

    fn dequantized(self) -> Option<(f64, T)> {
        None
    }
}

simd!(fn sign_slice<T: Real>(xs: &[T], ys: &mut [T], a: T, s: T) = sign_body);

#[inline(always)]
fn sign_body<T: Real>(xs: &[T], ys: &mut [T], a: T, s: T) {
    let (nega, negs) = (T::ZERO - a, T::ZERO - s);
    for (y, &v) in ys.iter_mut().zip(xs) {
        let up = if v >= a { s } else { T::ZERO };
        *y = if v <= nega { negs } else { up };
    }
}

/// PACT's parameters in `T`.
#[derive(Clone, Copy)]
struct PactPass<T> {
    s: T,
    neg: T,
    im: T,
    dequantize: bool,
}

impl<T: Real> PactPass<T> {
    fn new(s: f64, int_max: i64, dequantize: bool) -> Self {
        let (s, im) = (T::from_f64(s), T::from_f64(int_max as f64));
        Self { s, neg: T::ZERO - im, im, dequantize }
    }
}

impl<T: Real> Pass<T> for PactPass<T> {
    fn run(self, xs: &[T], ys: &mut [T]) {
        pact_slice(xs, ys, self.s, self.neg, self.im, self.dequantize)
    }

    fn dequantized(self) -> Option<(f64, T)> {
        self.dequantize.then(|| (self.im.to_f64(), self.s))
    }
}

/// [`pact`] for element type `T`.
fn pact_typed<T: Real>(x: &Tensor, s: f64, int_max: i64, dequantize: bool) -> Tensor {
    run_new(x, PactPass::<T>::new(s, int_max, dequantize))
}

/// [`pact_to`] for element type `T`.
fn pact_to_typed<T: Real>(x: &Tensor, dst: &mut Tensor, s: f64, int_max: i64, dequantize: bool) {
    // SAFETY: the caller checked fits(dst, x); by_kind! chose T from x's dtype.
    unsafe { run_to(x, dst, PactPass::<T>::new(s, int_max, dequantize)) }
}

simd!(fn pact_slice<T: Real>(xs: &[T], ys: &mut [T], s: T, neg: T, im: T, dequantize: bool) = pact_body);

#[inline(always)]
fn pact_body<T: Real>(xs: &[T], ys: &mut [T], s: T, neg: T, im: T, dequantize: bool) {
    if dequantize {
        for (y, &v) in ys.iter_mut().zip(xs) {
            *y = round_even(clamp(v * s, neg, im)) / s;
        }
    } else {
        for (y, &v) in ys.iter_mut().zip(xs) {
            *y = round_even(clamp(v * s, neg, im));
        }
    }
}

/// PACT's backward over `x` for upstream gradient `g`: `g * gx_scale` where `|x| < alpha` (0
/// elsewhere and at NaN; only with `want_gx`), and `sum(g where x >= alpha) - sum(g where
/// x <= -alpha)` accumulated in float64.
fn pact_backward_typed<T: Real>(
    x: &Tensor,
    g: Grad,
    alpha: f64,
    gx_scale: f64,
    want_gx: bool,
) -> (Option<Tensor>, f64) {
    // SAFETY: the caller checked eligible(), and by_kind! chose T from that dtype.
    let xs = unsafe { slice::<T>(x) };
    let (a, k) = (T::from_f64(alpha), T::from_f64(gx_scale));
    let nega = T::ZERO - a;
    let gs: Option<&[T]> = match g {
        // SAFETY: Grad::of checked a contiguous CPU tensor of x's dtype and shape.
        Grad::Tensor(t) => Some(unsafe { slice::<T>(t) }),
        Grad::Scalar(_) => None,
    };
    let scalar = match g {
        Grad::Scalar(v) => Some(T::from_f64(v)),
        Grad::Tensor(_) => None,
    };
    if !want_gx {
        let sum = std::sync::Mutex::new(0.0f64);
        let total = &sum;
        crate::glue::parallel_for(xs.len(), PARALLEL_MIN / 2, move |b, e| {
            let part = pact_backward_slice(&xs[b..e], gs.map(|g| &g[b..e]), scalar, None, a, nega, k);
            *total.lock().unwrap_or_else(|p| p.into_inner()) += part;
        });
        return (None, sum.into_inner().unwrap_or_else(|p| p.into_inner()));
    }
    let mut sum = 0.0;
    let gx = fill_new::<T>(x, |gxs| {
        sum = for_chunks_reduce(xs, gxs, move |off, xs, gxs| {
            pact_backward_slice(xs, gs.map(|g| &g[off..off + xs.len()]), scalar, Some(gxs), a, nega, k)
        });
    });
    (Some(gx), sum)
}

// One chunk of PACT's backward: `gxs` (where wanted) and the chunk's alpha sum. The gradient
// is `gs`, or `scalar` everywhere when `gs` is `None`. Every parameter by value and one loop
// per case, so that each loop vectorises.
simd!(fn pact_backward_slice<T: Real>(
    xs: &[T],
    gs: Option<&[T]>,
    scalar: Option<T>,
    gxs: Option<&mut [T]>,
    a: T,
    nega: T,
    k: T
) -> f64 = pact_backward_body);

#[inline(always)]
fn pact_backward_body<T: Real>(
    xs: &[T],
    gs: Option<&[T]>,
    scalar: Option<T>,
    gxs: Option<&mut [T]>,
    a: T,
    nega: T,
    k: T,
) -> f64 {
    // Selects rather than products: a NaN x (or inf * 0) never reaches either result.
    #[inline(always)]
    fn step<T: Real>(v: T, gi: T, a: T, nega: T, k: T) -> (T, T) {
        let inside = if v.abs() < a { gi * k } else { T::ZERO };
        let up = if v >= a { gi } else { T::ZERO };
        let lo = if v <= nega { gi } else { T::ZERO };
        (inside, up - lo)
    }
    // Four float64 partial sums, element i into lane i % 4: exact enough for any size. The
    // loops walk groups of four so that the lanes are one vector register (an `acc[i & 3]`
    // index kept the loop scalar).
    let mut acc = [0.0f64; 4];
    #[inline(always)]
    fn add4<T: Real>(acc: &mut [f64; 4], c: [T; 4]) {
        for j in 0..4 {
            acc[j] += c[j].to_f64();
        }
    }
    match (gs, scalar, gxs) {
        (Some(gs), _, Some(gxs)) => {
            let (mut x4, mut g4, mut o4) = (xs.chunks_exact(4), gs.chunks_exact(4), gxs.chunks_exact_mut(4));
            for ((x, g), o) in (&mut x4).zip(&mut g4).zip(&mut o4) {
                let mut c = [T::ZERO; 4];
                for j in 0..4 {
                    (o[j], c[j]) = step(x[j], g[j], a, nega, k);
                }
                add4(&mut acc, c);
            }
            let tail = x4.remainder().iter().zip(g4.remainder()).zip(o4.into_remainder());
            for (j, ((&v, &gi), o)) in tail.enumerate() {
                let (gx, c) = step(v, gi, a, nega, k);
                *o = gx;
                acc[j] += c.to_f64();
            }
        }
        (None, Some(gi), Some(gxs)) => {
            let (mut x4, mut o4) = (xs.chunks_exact(4), gxs.chunks_exact_mut(4));
            for (x, o) in (&mut x4).zip(&mut o4) {
                let mut c = [T::ZERO; 4];
                for j in 0..4 {
                    (o[j], c[j]) = step(x[j], gi, a, nega, k);
                }
                add4(&mut acc, c);
            }
            for (j, (&v, o)) in x4.remainder().iter().zip(o4.into_remainder()).enumerate() {
                let (gx, c) = step(v, gi, a, nega, k);
                *o = gx;
                acc[j] += c.to_f64();
            }
        }
        (Some(gs), _, None) => {
            let (mut x4, mut g4) = (xs.chunks_exact(4), gs.chunks_exact(4));
            for (x, g) in (&mut x4).zip(&mut g4) {
                add4(&mut acc, std::array::from_fn(|j| step(x[j], g[j], a, nega, k).1));
            }
            for (j, (&v, &gi)) in x4.remainder().iter().zip(g4.remainder()).enumerate() {
                acc[j] += step(v, gi, a, nega, k).1.to_f64();
            }
        }
        (None, Some(gi), None) => {
            let mut x4 = xs.chunks_exact(4);
            for x in &mut x4 {
                add4(&mut acc, std::array::from_fn(|j| step(x[j], gi, a, nega, k).1));
            }
            for (j, &v) in x4.remainder().iter().enumerate() {
                acc[j] += step(v, gi, a, nega, k).1.to_f64();
            }
        }
        (None, None, _) => {}
    }
    acc.iter().sum()
}
