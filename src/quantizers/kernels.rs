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
    /// 1.5 * 2^(mantissa bits): adding and subtracting it rounds half to even for |v| < 2^(mantissa - 1).
    const MAGIC: Self;
    const KIND: Kind;
    fn abs(self) -> Self;
    fn copysign(self, sign: Self) -> Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const MAGIC: Self = 12_582_912.0;
    const KIND: Kind = Kind::Float;
    fn abs(self) -> Self {
        f32::abs(self)
    }
    fn copysign(self, sign: Self) -> Self {
        f32::copysign(self, sign)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const MAGIC: Self = 6_755_399_441_055_744.0;
    const KIND: Kind = Kind::Double;
    fn abs(self) -> Self {
        f64::abs(self)
    }
    fn copysign(self, sign: Self) -> Self {
        f64::copysign(self, sign)
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
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

/// PACT's training pass (see [`pact_train_typed`]).
pub(crate) fn pact_train(
    x: &Tensor,
    kind: Kind,
    s: f64,
    int_max: i64,
    alpha: f64,
    integers: bool,
) -> Option<(Tensor, Tensor, Tensor)> {
    by_kind!(kind, pact_train_typed(x, s, int_max, alpha, integers))
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

fn threads_for(len: usize) -> usize {
    if len < PARALLEL_MIN {
        1
    } else {
        (tch::get_num_threads().max(1) as usize).min(len / (PARALLEL_MIN / 2)).max(1)
    }
}

/// Runs `f` over matching chunks of `src` and each of `dst`, on torch's thread count.
fn for_chunks<T: Real, const N: usize>(
    src: &[T],
    dst: [&mut [T]; N],
    f: impl Fn(&[T], [&mut [T]; N]) + Sync,
) {
    let threads = threads_for(src.len());
    if threads == 1 {
        return f(src, dst);
    }
    let chunk = src.len().div_ceil(threads);
    let mut parts: Vec<[&mut [T]; N]> = (0..threads).map(|_| std::array::from_fn(|_| &mut [][..])).collect();
    for (k, d) in dst.into_iter().enumerate() {
        for (i, c) in d.chunks_mut(chunk).enumerate() {
            parts[i][k] = c;
        }
    }
    std::thread::scope(|s| {
        for (src, dst) in src.chunks(chunk).zip(parts) {
            let f = &f;
            s.spawn(move || f(src, dst));
        }
    });
}

/// [`abs_max`] for element type `T`.
fn abs_max_typed<T: Real>(x: &Tensor) -> (f64, bool) {
    // SAFETY: the caller checked eligible(), and by_kind! chose T from that dtype.
    let xs = unsafe { slice::<T>(x) };
    let reduce = |xs: &[T]| {
        // Eight independent lanes so the compiler vectorises; `probe` turns NaN for inf or NaN.
        let (mut acc, mut probe) = ([T::ZERO; 8], [T::ZERO; 8]);
        let mut chunks = xs.chunks_exact(8);
        for c in &mut chunks {
            for j in 0..8 {
                let a = c[j].abs();
                acc[j] = if a > acc[j] { a } else { acc[j] };
                probe[j] = probe[j] + a * T::ZERO;
            }
        }
        for &v in chunks.remainder() {
            let a = v.abs();
            acc[0] = if a > acc[0] { a } else { acc[0] };
            probe[0] = probe[0] + a * T::ZERO;
        }
        let m = acc.iter().fold(T::ZERO, |m, &a| if a > m { a } else { m });
        let finite = probe.iter().all(|p| *p == T::ZERO);
        (m.to_f64(), finite)
    };
    let threads = threads_for(xs.len());
    if threads == 1 {
        return reduce(xs);
    }
    let parts: Vec<(f64, bool)> = std::thread::scope(|s| {
        let hs: Vec<_> = xs.chunks(xs.len().div_ceil(threads)).map(|c| s.spawn(move || reduce(c))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    parts.into_iter().fold((0.0, true), |(m, f), (pm, pf)| (m.max(pm), f && pf))
}

/// What a MinMax kernel writes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MinMaxOut {
    /// `round(clamp(x, -m, m) * s)`.
    Integers,
    /// `round(clamp(x, -m, m) * s) / s`.
    Dequantized,
    /// The dequantized value minus `x` (exact: the two lie within a factor of two, or the first is zero).
    DeltaToX,
    /// The integers minus `x * s` (exact for the same reason).
    DeltaToScaledX,
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
    for_chunks(xs, [ys], |xs, [ys]| match out {
        MinMaxOut::Integers => {
            for (y, &v) in ys.iter_mut().zip(xs) {
                *y = round_even(clamp(v, neg, m) * s);
            }
        }
        MinMaxOut::Dequantized => {
            for (y, &v) in ys.iter_mut().zip(xs) {
                *y = round_even(clamp(v, neg, m) * s) / s;
            }
        }
        MinMaxOut::DeltaToX => {
            for (y, &v) in ys.iter_mut().zip(xs) {
                *y = round_even(clamp(v, neg, m) * s) / s - v;
            }
        }
        MinMaxOut::DeltaToScaledX => {
            for (y, &v) in ys.iter_mut().zip(xs) {
                *y = round_even(clamp(v, neg, m) * s) - v * s;
            }
        }
    });
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
    for_chunks(xs, [ys], |xs, [ys]| pact_slice(xs, ys, s, neg, im, dequantize));
}

fn pact_slice<T: Real>(xs: &[T], ys: &mut [T], s: T, neg: T, im: T, dequantize: bool) {
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

/// PACT's training pass over `x`: the inside mask `m`, the clip sign `c` and an exact correction `e`.
/// `sur = x*m + alpha*c` carries PACT's gradient (`m = 1` where `|x| < alpha`, `c = sign(x)` where
/// `|x| >= alpha`); `e + sur` is the dequantized output, or with `integers`, `e + sur * s` is the
/// integer output. `None` when `x` holds NaN.
fn pact_train_typed<T: Real>(
    x: &Tensor,
    s: f64,
    int_max: i64,
    alpha: f64,
    integers: bool,
) -> Option<(Tensor, Tensor, Tensor)> {
    // SAFETY: the caller checked eligible(), and by_kind! chose T from that dtype.
    let xs = unsafe { slice::<T>(x) };
    let (e, es) = empty_like::<T>(x);
    let (m, ms) = empty_like::<T>(x);
    let (c, cs) = empty_like::<T>(x);
    let (s, im, a) = (T::from_f64(s), T::from_f64(int_max as f64), T::from_f64(alpha));
    let (neg, nega) = (T::ZERO - im, T::ZERO - a);
    let one = T::from_f64(1.0);
    let non_finite = std::sync::atomic::AtomicBool::new(false);
    for_chunks(xs, [es, ms, cs], |xs, [es, ms, cs]| {
        // Three simple loops rather than one branchy one: each vectorises.
        pact_slice(xs, es, s, neg, im, !integers);
        let mut nan = 0u8;
        for ((&v, mi), ci) in xs.iter().zip(ms.iter_mut()).zip(cs.iter_mut()) {
            // v * 0 is NaN exactly for NaN and ±inf.
            nan |= u8::from(v * T::ZERO != T::ZERO);
            let pos = if v >= a { one } else { T::ZERO };
            let negative = if v <= nega { one } else { T::ZERO };
            *ci = pos - negative;
            *mi = one - pos - negative;
        }
        if nan != 0 {
            non_finite.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // The output minus the surrogate: exact, as both lie within a factor of two (Sterbenz).
        // A select, not x*m + alpha*c, so that an infinite x stays out of it.
        let pairs = xs.iter().zip(cs.iter()).zip(es.iter_mut());
        if integers {
            for ((&v, &c), e) in pairs {
                let sur = if c == T::ZERO { v } else { a * c };
                *e = *e - sur * s;
            }
        } else {
            for ((&v, &c), e) in pairs {
                let sur = if c == T::ZERO { v } else { a * c };
                *e = *e - sur;
            }
        }
    });
    // NaN fails every comparison above and ±inf turns x*m into inf*0: leave both to the selecting path.
    (!non_finite.into_inner()).then_some((e, m, c))
}
