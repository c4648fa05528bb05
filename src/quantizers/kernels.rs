//! Fused CPU kernels: each quantizer in one or two passes over contiguous memory,
//! bit for bit the same arithmetic as the libtorch path (which stays the reference
//! and the path for CUDA, other layouts, half precision and non-finite inputs).

use tch::{Device, Kind, Tensor};

/// Elements below which one thread does all the work (thread start-up costs more).
const PARALLEL_MIN: usize = 1 << 18;

/// The float types the kernels handle.
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Mul<Output = Self>
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Div<Output = Self>
    + 'static
{
    const ZERO: Self;
    /// The largest finite value.
    const MAX: Self;
    /// 1.5 * 2^(mantissa bits): adding and subtracting it rounds half to even for |v| < 2^(mantissa - 1).
    const MAGIC: Self;
    const KIND: Kind;
    fn abs(self) -> Self;
    fn copysign(self, sign: Self) -> Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    /// `max |x|` and whether every element is finite, from the bit patterns: without the sign
    /// bit, IEEE floats order as unsigned integers, and only inf and NaN reach the exponent's
    /// all-ones. One integer max per element, which vectorises on every x86-64.
    fn abs_max_slice(xs: &[Self]) -> (f64, bool);
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const MAX: Self = f32::MAX;
    const MAGIC: Self = 12_582_912.0;
    const KIND: Kind = Kind::Float;
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn copysign(self, sign: Self) -> Self {
        f32::copysign(self, sign)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn abs_max_slice(xs: &[Self]) -> (f64, bool) {
        let mut lanes = [0i32; 16];
        let mut chunks = xs.chunks_exact(16);
        for c in &mut chunks {
            for j in 0..16 {
                lanes[j] = lanes[j].max((c[j].to_bits() & 0x7fff_ffff) as i32);
            }
        }
        let tail = chunks.remainder().iter().map(|v| (v.to_bits() & 0x7fff_ffff) as i32);
        let m = lanes.into_iter().chain(tail).max().unwrap_or(0);
        (f32::from_bits(m as u32).min(f32::MAX) as f64, m < 0x7f80_0000)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const MAX: Self = f64::MAX;
    const MAGIC: Self = 6_755_399_441_055_744.0;
    const KIND: Kind = Kind::Double;
    #[inline(always)]
    fn abs(self) -> Self {
        f64::abs(self)
    }
    #[inline(always)]
    fn copysign(self, sign: Self) -> Self {
        f64::copysign(self, sign)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    fn abs_max_slice(xs: &[Self]) -> (f64, bool) {
        let mut lanes = [0i64; 8];
        let mut chunks = xs.chunks_exact(8);
        for c in &mut chunks {
            for j in 0..8 {
                lanes[j] = lanes[j].max((c[j].to_bits() & 0x7fff_ffff_ffff_ffff) as i64);
            }
        }
        let tail = chunks.remainder().iter().map(|v| (v.to_bits() & 0x7fff_ffff_ffff_ffff) as i64);
        let m = lanes.into_iter().chain(tail).max().unwrap_or(0);
        (f64::from_bits(m as u64).min(f64::MAX), m < 0x7ff0_0000_0000_0000)
    }
}

/// `torch.round` for |v| < 2^22 (float32) or 2^51 (float64): half to even, sign of zero kept.
#[inline(always)]
fn round_even<T: Real>(v: T) -> T {
    ((v + T::MAGIC) - T::MAGIC).copysign(v)
}

/// `torch.clamp`: NaN stays NaN.
#[inline(always)]
fn clamp<T: Real>(v: T, lo: T, hi: T) -> T {
    if v < lo {
        lo
    } else if v > hi {
        hi
    } else {
        v
    }
}

/// Calls `$body` (an `#[inline(always)]` kernel loop) compiled for AVX2 where the CPU has it,
/// else for the baseline: twice the vector width for the same IEEE arithmetic (no FMA), so
/// results stay bit for bit the same.
macro_rules! simd {
    (fn $name:ident<$t:ident: Real>($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $body:ident) => {
        fn $name<$t: Real>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2<$t: Real>($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// Runs the `T = f32` or `T = f64` instance of a kernel for a dtype from [`eligible`], so
/// that no caller can pair a buffer with the wrong element type.
macro_rules! by_kind {
    ($kind:expr, $f:ident($($arg:expr),*)) => {
        if $kind == Kind::Double { $f::<f64>($($arg),*) } else { $f::<f32>($($arg),*) }
    };
}

/// `max |x|` and whether every element is finite, in one pass; `kind` from [`eligible`].
pub(crate) fn abs_max(x: &Tensor, kind: Kind) -> (f64, bool) {
    by_kind!(kind, abs_max_typed(x))
}

/// One MinMax pass over a finite `x` with range `m` and scale `s`, into a new tensor.
pub(crate) fn minmax(x: &Tensor, kind: Kind, m: f64, s: f64, out: MinMaxOut) -> Tensor {
    by_kind!(kind, minmax_typed(x, m, s, out))
}

/// Like [`minmax`], into `dst` (see [`fits`]).
pub(crate) fn minmax_to(x: &Tensor, kind: Kind, dst: &mut Tensor, m: f64, s: f64, out: MinMaxOut) {
    by_kind!(kind, minmax_to_typed(x, dst, m, s, out))
}

/// One PACT pass: integers `round(clamp(x * s, -im, im))`, or those divided by `s`, into a new tensor.
pub(crate) fn pact(x: &Tensor, kind: Kind, s: f64, int_max: i64, dequantize: bool) -> Tensor {
    by_kind!(kind, pact_typed(x, s, int_max, dequantize))
}

/// Like [`pact`], into `dst` (see [`fits`]).
pub(crate) fn pact_to(x: &Tensor, kind: Kind, dst: &mut Tensor, s: f64, int_max: i64, dequantize: bool) {
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
            // SAFETY: a CPU tensor of x's float dtype with at least one element.
            let v = match g.kind() {
                Kind::Float => unsafe { *(g.data_ptr() as *const f32) as f64 },
                _ => unsafe { *(g.data_ptr() as *const f64) },
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

/// The elements of a contiguous CPU tensor of element type `T`.
///
/// SAFETY: the caller checked [`eligible`] with `T::KIND`; the slice lives while `x` does.
unsafe fn slice<T: Real>(x: &Tensor) -> &[T] {
    std::slice::from_raw_parts(x.data_ptr() as *const T, x.numel())
}

/// A fresh contiguous tensor shaped like `x` (dtype `T`), with its elements.
fn empty_like<T: Real>(x: &Tensor) -> (Tensor, &'static mut [T]) {
    let t = Tensor::empty(x.size(), (T::KIND, Device::Cpu));
    // SAFETY: a new, contiguous, uniquely owned CPU buffer of numel elements; the
    // returned tensor owns it and outlives every use of the slice in this module.
    let s = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, t.numel()) };
    (t, s)
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

/// What a MinMax kernel writes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MinMaxOut {
    /// `round(clamp(x, -m, m) * s)`.
    Integers,
    /// `round(clamp(x, -m, m) * s) / s`.
    Dequantized,
}

/// Whether `dst` can receive a kernel's output for `x`: same shape and dtype, contiguous, CPU, no grad.
pub(crate) fn fits(dst: &Tensor, x: &Tensor) -> bool {
    dst.device() == Device::Cpu
        && dst.kind() == x.kind()
        && dst.size() == x.size()
        && dst.is_contiguous()
        && !dst.requires_grad()
}

/// The elements of `dst` for writing.
///
/// SAFETY: the caller checked [`fits`] against an eligible `x` of type `T`, and holds `dst`
/// mutably, so nothing else reads or writes it meanwhile.
unsafe fn slice_mut<T: Real>(dst: &mut Tensor) -> &mut [T] {
    std::slice::from_raw_parts_mut(dst.data_ptr() as *mut T, dst.numel())
}

/// [`minmax`] for element type `T`.
fn minmax_typed<T: Real>(x: &Tensor, m: f64, s: f64, out: MinMaxOut) -> Tensor {
    let (t, ys) = empty_like::<T>(x);
    minmax_into(x, ys, m, s, out);
    t
}

/// [`minmax_to`] for element type `T`.
fn minmax_to_typed<T: Real>(x: &Tensor, dst: &mut Tensor, m: f64, s: f64, out: MinMaxOut) {
    // SAFETY: fits() was checked by the caller.
    minmax_into(x, unsafe { slice_mut::<T>(dst) }, m, s, out)
}

fn minmax_into<T: Real>(x: &Tensor, ys: &mut [T], m: f64, s: f64, out: MinMaxOut) {
    // SAFETY: the caller checked eligible(), and by_kind! chose T from that dtype.
    let xs = unsafe { slice::<T>(x) };
    let (m, s) = (T::from_f64(m), T::from_f64(s));
    let neg = T::ZERO - m;
    // `move`: parameters by value, so the loop keeps them in registers and vectorises.
    let dequantize = out == MinMaxOut::Dequantized;
    let int_max = (m * s).to_f64();
    for_chunks(xs, [ys], move |xs, [ys]| minmax_slice(xs, ys, neg, m, s, dequantize));
    if dequantize {
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

/// [`pact`] for element type `T`.
fn pact_typed<T: Real>(x: &Tensor, s: f64, int_max: i64, dequantize: bool) -> Tensor {
    let (t, ys) = empty_like::<T>(x);
    pact_into(x, ys, s, int_max, dequantize);
    t
}

/// [`pact_to`] for element type `T`.
fn pact_to_typed<T: Real>(x: &Tensor, dst: &mut Tensor, s: f64, int_max: i64, dequantize: bool) {
    // SAFETY: fits() was checked by the caller.
    pact_into(x, unsafe { slice_mut::<T>(dst) }, s, int_max, dequantize)
}

fn pact_into<T: Real>(x: &Tensor, ys: &mut [T], s: f64, int_max: i64, dequantize: bool) {
    // SAFETY: the caller checked eligible(), and by_kind! chose T from that dtype.
    let xs = unsafe { slice::<T>(x) };
    let (s, im) = (T::from_f64(s), T::from_f64(int_max as f64));
    let neg = T::ZERO - im;
    for_chunks(xs, [ys], move |xs, [ys]| pact_slice(xs, ys, s, neg, im, dequantize));
    if dequantize {
        saturate(ys, int_max as f64, s);
    }
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
    let (gx, gxs) = empty_like::<T>(x);
    let sum = for_chunks_reduce(xs, gxs, move |off, xs, gxs| {
        pact_backward_slice(xs, gs.map(|g| &g[off..off + xs.len()]), scalar, Some(gxs), a, nega, k)
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
    // Four float64 partial sums: exact enough for any size and independent of the chunking.
    let mut acc = [0.0f64; 4];
    match (gs, scalar, gxs) {
        (Some(gs), _, Some(gxs)) => {
            for (i, ((&v, &gi), o)) in xs.iter().zip(gs).zip(gxs.iter_mut()).enumerate() {
                let (gx, c) = step(v, gi, a, nega, k);
                *o = gx;
                acc[i & 3] += c.to_f64();
            }
        }
        (None, Some(gi), Some(gxs)) => {
            for (i, (&v, o)) in xs.iter().zip(gxs.iter_mut()).enumerate() {
                let (gx, c) = step(v, gi, a, nega, k);
                *o = gx;
                acc[i & 3] += c.to_f64();
            }
        }
        (Some(gs), _, None) => {
            for (i, (&v, &gi)) in xs.iter().zip(gs).enumerate() {
                acc[i & 3] += step(v, gi, a, nega, k).1.to_f64();
            }
        }
        (None, Some(gi), None) => {
            for (i, &v) in xs.iter().enumerate() {
                acc[i & 3] += step(v, gi, a, nega, k).1.to_f64();
            }
        }
        (None, None, _) => {}
    }
    acc.iter().sum()
}
