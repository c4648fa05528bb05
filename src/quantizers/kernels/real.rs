//! The element types of the kernels (float32, float64), torch's rounding and clamping on them,
//! and the AVX2 dispatch every loop uses.

use tch::Kind;

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
pub(super) fn round_even<T: Real>(v: T) -> T {
    ((v + T::MAGIC) - T::MAGIC).copysign(v)
}

/// `torch.clamp`: NaN stays NaN.
#[inline(always)]
pub(super) fn clamp<T: Real>(v: T, lo: T, hi: T) -> T {
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

#[cfg(test)]
mod tests {
    use super::{clamp, round_even};

    #[test]
    fn round_even_is_torch_round_below_two_to_the_22() {
        for i in -40_000i32..40_000 {
            let v = i as f32 * 0.25 + 0.125 * (i % 3) as f32;
            assert_eq!(round_even(v).to_bits(), v.round_ties_even().to_bits(), "{v}");
            let d = v as f64 * 1.000_001;
            assert_eq!(round_even(d).to_bits(), d.round_ties_even().to_bits(), "{d}");
        }
        assert_eq!(round_even(-0.4f32).to_bits(), (-0.0f32).to_bits(), "the sign of zero is kept");
        assert_eq!(round_even(4_194_303.5f32), 4_194_304.0);
    }

    #[test]
    fn clamp_keeps_nan() {
        assert!(clamp(f32::NAN, -1.0, 1.0).is_nan());
        assert_eq!(clamp(5.0f64, -1.0, 1.0), 1.0);
        assert_eq!(clamp(f32::NEG_INFINITY, -1.0, 1.0), -1.0);
    }
}
