//! The `ApproxQuantizer` trait and what every quantizer shares: bitwidth, dtypes, non-finite policy.

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// The smallest supported bitwidth.
pub const MIN_BITWIDTH: u32 = 2;
/// The largest supported bitwidth.
pub const MAX_BITWIDTH: u32 = 16;

/// Checks that `bitwidth` lies in `2..=16`.
pub fn check_bitwidth(bitwidth: u32) -> Result<u32> {
    if (MIN_BITWIDTH..=MAX_BITWIDTH).contains(&bitwidth) {
        Ok(bitwidth)
    } else {
        Err(Error::Bitwidth(bitwidth))
    }
}

/// The largest integer of a signed symmetric range: `2^(bitwidth-1) - 1`.
pub fn int_max(bitwidth: u32) -> i64 {
    (1i64 << (bitwidth - 1)) - 1
}

/// Checks an `int_max` given directly to a `Quant` node: that of some bitwidth in `2..=16`.
pub(crate) fn check_int_max(int_max: i64) -> Result<()> {
    if (MIN_BITWIDTH..=MAX_BITWIDTH).any(|b| self::int_max(b) == int_max) {
        Ok(())
    } else {
        Err(Error::Argument {
            what: "int_max",
            value: int_max as f64,
            expected: "2^(bitwidth-1) - 1 for a bitwidth in 2..=16",
        })
    }
}

/// What a quantizer does with NaN and infinite inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonFinite {
    /// ±inf saturates to ±`int_max`, NaN stays NaN in the output; neither
    /// reaches stored state (MinMax's range, PACT's alpha or its gradient).
    #[default]
    Propagate,
    /// `f_quantize` returns [`Error::NonFinite`]. For PACT this costs one
    /// host-device sync per call.
    Reject,
}

/// Where MinMax takes its range from.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RangeMode {
    /// The tensor of each call (TorchApprox's behaviour): an evaluation result depends on
    /// the other samples of its batch.
    #[default]
    Batch,
    /// An exponential moving average of the per-batch ranges, updated in training
    /// (`range = momentum * range + (1 - momentum) * batch_range`; the first batch sets it)
    /// and frozen in evaluation, kept as the variable `running_max` (saved in checkpoints).
    /// Before any training batch (or calibration) evaluation falls back to the batch range.
    Running {
        /// Weight of the old range, in `[0, 1)`.
        momentum: f64,
    },
}

/// Settings shared by the quantizers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantConfig {
    /// Bits of the signed integer range, `2..=16`.
    pub bitwidth: u32,
    /// Initial clipping level of PACT's `alpha` (ignored by MinMax).
    pub init_alpha: f64,
    /// Handling of NaN and infinite inputs.
    pub nonfinite: NonFinite,
    /// Round to integers (`true`, the default); `false` keeps the scaled,
    /// clipped values, as the original's `quantize(x, rounded=False)`.
    pub rounded: bool,
    /// MinMax only: one range per output channel (index of dim 0) for tensors
    /// of two or more dimensions, as for Linear and Conv weights.
    pub per_channel: bool,
    /// MinMax only: per-call or running range (needs a VarStore path; per-channel
    /// quantizers always use the tensor's own ranges).
    pub range: RangeMode,
}

impl Default for QuantConfig {
    /// 8 bits and `alpha = 2.2`, as in TorchApprox.
    fn default() -> Self {
        Self {
            bitwidth: 8,
            init_alpha: 2.2,
            nonfinite: NonFinite::Propagate,
            rounded: true,
            per_channel: false,
            range: RangeMode::Batch,
        }
    }
}

impl QuantConfig {
    /// The default configuration with another bitwidth.
    pub fn with_bitwidth(bitwidth: u32) -> Self {
        Self { bitwidth, ..Self::default() }
    }
}

/// A quantized tensor: integer values plus the scale that maps floats onto them.
#[derive(Debug)]
pub struct Quantized {
    /// Integer-valued floats in `[-int_max, int_max]` (float32 for half-precision inputs,
    /// whose mantissa cannot hold every integer of a 16-bit range).
    pub values: Tensor,
    /// A 0-dim tensor on the input's device: `values ≈ x * scale`. Constant for
    /// autograd; the gradients are carried by `values`.
    pub scale: Tensor,
}

impl Quantized {
    /// Maps the integers back to floats: `values / scale`.
    pub fn f_dequantize(&self) -> Result<Tensor> {
        Ok(self.values.f_div(&self.scale)?)
    }
}

/// The interface of every quantizer, after TorchApprox's `ApproxQuantizer`.
///
/// Gradients are straight-through (rounding acts as identity) and are defined
/// on the dequantized output `values / scale`; see each quantizer for details.
pub trait ApproxQuantizer: std::fmt::Debug + Send {
    /// The configured bitwidth.
    fn bitwidth(&self) -> u32;

    /// The largest representable integer, `2^(bitwidth-1) - 1`.
    fn int_max(&self) -> i64 {
        int_max(self.bitwidth())
    }

    /// The factor that maps floats to the integer range (MinMax: of its last
    /// call, 0.0 before any; PACT: `int_max / alpha`, which reads `alpha` from the device).
    fn scale_factor(&self) -> f64;

    /// Quantizes `x` and returns the integer values with their scale tensor.
    fn f_quantize_scaled(&self, x: &Tensor) -> Result<Quantized>;

    /// Like [`f_quantize_scaled`](Self::f_quantize_scaled) in training (`train`) or evaluation:
    /// the two differ only for quantizers with state that training updates (MinMax's
    /// running range).
    fn f_quantize_scaled_t(&self, x: &Tensor, train: bool) -> Result<Quantized> {
        let _ = train;
        self.f_quantize_scaled(x)
    }

    /// Maps `x` to integer values in `[-int_max, int_max]`, as the original's `quantize`.
    fn f_quantize(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.f_quantize_scaled(x)?.values)
    }

    /// Like [`f_quantize`](Self::f_quantize), panicking on error.
    fn quantize(&self, x: &Tensor) -> Tensor {
        self.f_quantize(x).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Fake quantization: quantize, then divide by the scale; same dtype as `x`.
    fn f_fake_quantize(&self, x: &Tensor) -> Result<Tensor> {
        let q = self.f_quantize_scaled(x)?;
        Ok(q.f_dequantize()?.f_to_kind(x.kind())?)
    }

    /// Fake quantization into a preallocated `out` of `x`'s shape, without gradient.
    ///
    /// Reusing `out` spares the allocation, which for large tensors costs more than
    /// the arithmetic (fresh pages fault in); MinMax and PACT then write in place on CPU.
    fn f_fake_quantize_out(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        copy_fake_quantized(self, x, out)
    }
}

/// The general `f_fake_quantize_out`: compute, then copy into `out`, without gradient.
pub(crate) fn copy_fake_quantized<Q: ApproxQuantizer + ?Sized>(
    q: &Q,
    x: &Tensor,
    out: &mut Tensor,
) -> Result<()> {
    check_out(x, out)?;
    let _guard = tch::no_grad_guard();
    out.f_copy_(&q.f_fake_quantize(x)?)?;
    Ok(())
}

/// The dtype quantization is computed in: float64 stays, the rest run in float32.
pub(crate) fn compute_kind(x: &Tensor) -> Result<Kind> {
    match x.kind() {
        Kind::Double => Ok(Kind::Double),
        Kind::Float | Kind::Half | Kind::BFloat16 => Ok(Kind::Float),
        other => Err(Error::Dtype(other)),
    }
}

/// `int_max / range` rounded as the compute dtype rounds it, so that scalar
/// multiplication reproduces PyTorch's tensor arithmetic bit for bit.
pub(crate) fn scale_for(int_max: i64, range: f64, kind: Kind) -> f64 {
    match kind {
        Kind::Double => int_max as f64 / range,
        _ => (int_max as f32 / range as f32) as f64,
    }
}

/// Refuses an undefined tensor (`Tensor::new()`), which libtorch would answer with a panic.
pub fn check_defined(t: &Tensor, what: &'static str) -> Result<()> {
    if t.defined() {
        Ok(())
    } else {
        Err(Error::Undefined(what))
    }
}

/// Whether the memory of `a` and `b` overlaps (same device, byte ranges intersecting).
pub(crate) fn memory_overlaps(a: &Tensor, b: &Tensor) -> bool {
    if a.device() != b.device() || a.numel() == 0 || b.numel() == 0 {
        return false;
    }
    let span = |t: &Tensor| {
        let start = t.data_ptr() as usize;
        let last: i64 = t.size().iter().zip(t.stride()).map(|(n, s)| (n - 1) * s).sum();
        (start, start + (last.max(0) as usize + 1) * t.kind().elt_size_in_bytes())
    };
    let ((a0, a1), (b0, b1)) = (span(a), span(b));
    a0 < b1 && b0 < a1
}

/// Checks `x` and `out` of `f_fake_quantize_out`: both defined, `out` of `x`'s shape.
pub(crate) fn check_out(x: &Tensor, out: &Tensor) -> Result<()> {
    check_defined(x, "input")?;
    check_defined(out, "out")?;
    if out.size() != x.size() {
        return Err(Error::Shape {
            what: "out".into(),
            expected: format!("the input's {:?}", x.size()),
            actual: out.size(),
        });
    }
    Ok(())
}

/// Whether autograd is recording, so that gradient plumbing is skipped in inference.
pub(crate) fn grad_enabled() -> bool {
    // SAFETY: toggling the thread-local grad mode and restoring it at once.
    unsafe {
        let prev = torch_sys::at_grad_set_enabled(1);
        torch_sys::at_grad_set_enabled(prev);
        prev != 0
    }
}

/// Counts NaN and infinite elements (one host-device sync).
pub(crate) fn count_nonfinite(x: &Tensor) -> Result<i64> {
    Ok(x.f_isfinite()?.f_logical_not()?.f_sum(Kind::Int64)?.f_int64_value(&[])?)
}
