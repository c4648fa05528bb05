//! Table GEMMs: Linear and Conv2d whose every 8-bit product comes from a [`Multiplier`]'s table.

use tch::{Device, Kind, Tensor};

use super::Multiplier;
use crate::{Error, Result};

/// Rows per block: each weight index loaded serves this many table rows.
const ROWS: usize = 4;

/// The two's-complement bytes of an integer-valued tensor in `[-128, 127]` (one pass in Rust
/// over float32 CPU memory, which the quantizers produce; anything else is converted first).
fn to_bytes(t: &Tensor, what: &'static str) -> Result<Vec<u8>> {
    let t = t.f_detach()?;
    let t = if t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous() {
        t
    } else {
        t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?
    };
    // SAFETY: a contiguous float32 CPU tensor, alive while the slice is read.
    let v = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel()) };
    // Branch-free so that it vectorises: NaN and values beyond the range are first moved to
    // -129 or 128 (which the range test rejects), so the truncating cast needs no saturation.
    let mut out = vec![0u8; v.len()];
    let mut ok = true;
    for (o, &x) in out.iter_mut().zip(v) {
        // SAFETY: the value is finite and in [-129, 128] after max/min (max maps NaN to -129;
        // `clamp` would keep NaN, which the unchecked cast must never see).
        #[allow(clippy::manual_clamp)]
        let i: i32 = unsafe { x.max(-129.0).min(128.0).to_int_unchecked() };
        ok &= (i as f32 == x) & (-128..=127).contains(&i);
        *o = i as u8;
    }
    if !ok {
        let bad = v
            .iter()
            .find(|&&x| !((-128.0..=127.0).contains(&x) && x == x.trunc()))
            .copied()
            .unwrap_or(f32::NAN);
        return Err(not_int8(what, bad as f64));
    }
    Ok(out)
}

/// The error for a value that is not an 8-bit integer, shared by the CPU and gather paths.
fn not_int8(what: &'static str, bad: f64) -> Error {
    Error::Operand { what, value: bad }
}

/// Refuses values outside the integers of `[-128, 127]` on any device, naming the first one
/// (in memory order), as the CPU path's byte conversion does.
fn check_int8(t: &Tensor, what: &'static str) -> Result<()> {
    let v = t.f_detach()?.f_to_kind(Kind::Double)?;
    let bad = v.f_lt(-128.0)?.f_logical_or(&v.f_gt(127.0)?)?.f_logical_or(&v.f_ne_tensor(&v.f_trunc()?)?)?;
    if bad.f_any()?.f_int64_value(&[])? != 0 {
        let first = v.f_masked_select(&bad)?.f_double_value(&[0])?;
        return Err(not_int8(what, first));
    }
    Ok(())
}

/// The operands of a table GEMM: defined, `x` `[R, K]` and `w` `[O, K]`; both paths check this.
fn check_matmul(x: &Tensor, w: &Tensor) -> Result<()> {
    if !x.defined() {
        return Err(Error::Undefined("lut_matmul input"));
    }
    if !w.defined() {
        return Err(Error::Undefined("lut_matmul weight"));
    }
    let (xs, ws) = (x.size(), w.size());
    if xs.len() != 2 || ws.len() != 2 || xs[1] != ws[1] {
        return Err(Error::Shape {
            what: "lut_matmul".into(),
            expected: "x [R, K] and w [O, K]".into(),
            actual: [xs, ws].concat(),
        });
    }
    Ok(())
}

/// `w` `[O, K]` bytes transposed to `[K, O]`.
fn transposed(w: &[u8], o: usize, k: usize) -> Vec<u8> {
    let mut t = vec![0u8; w.len()];
    for j in 0..o {
        for kk in 0..k {
            t[kk * o + j] = w[j * k + kk];
        }
    }
    t
}

/// Where a table GEMM writes: rows `r` of `[R, O]` go to `out[(r / l) * o_total * l + (o_off + j) * l + r % l]`,
/// which is `[R, O]` itself for `l = 1` and the `[N, O_total, L]` layout of a convolution's output.
#[derive(Clone, Copy)]
struct Layout {
    l: usize,
    o_total: usize,
    o_off: usize,
}

/// `out[r][o] = sum_k table[x[r][k]][w[o][k]]` for integer-valued `x` `[R, K]` and `w` `[O, K]`, exactly
/// (int32 sums where the table's range allows, int64 otherwise), as float32 `[R, O]`.
///
/// CPU: a blocked table GEMM on libtorch's threads (the transposed weight's bytes index the
/// rows of the table that `x` selects, four rows of `x` per weight load). Elsewhere: libtorch
/// gathers in bounded chunks.
pub fn lut_matmul(x: &Tensor, w: &Tensor, m: &Multiplier) -> Result<Tensor> {
    check_matmul(x, w)?;
    let (xs, ws) = (x.size(), w.size());
    if x.device() != Device::Cpu {
        return lut_matmul_gather(x, w, m);
    }
    let (r, k, o) = (xs[0] as usize, xs[1] as usize, ws[0] as usize);
    let xb = to_bytes(x, "the input")?;
    let wt = transposed(&to_bytes(w, "the weight")?, o, k);
    let mut out = Tensor::f_empty([r as i64, o as i64], (Kind::Float, Device::Cpu))?;
    // SAFETY: `out` is a fresh contiguous float tensor of r * o elements, each written once.
    unsafe { table_gemm(&xb, &wt, r, k, o, m, &mut out, Layout { l: 1, o_total: o, o_off: 0 }) };
    Ok(out)
}

/// The table GEMM into `out` (float32, laid out as `layout` says).
///
/// SAFETY: `out` is a contiguous float32 CPU tensor large enough for `layout`, written only here.
#[allow(clippy::too_many_arguments)]
unsafe fn table_gemm(
    xv: &[u8],
    wv: &[u8],
    r: usize,
    k: usize,
    o: usize,
    m: &Multiplier,
    out: &mut Tensor,
    layout: Layout,
) {
    let base = out.data_ptr() as usize;
    let table = m.table();
    let wide = (m.max_abs() as i128) * (k as i128) > i32::MAX as i128;
    let blocks = r.div_ceil(ROWS);
    crate::glue::parallel_for(blocks, (1 << 14) / (k * o).max(1) + 1, |b, e| {
        let (mut acc32, mut acc64) = (vec![0i32; ROWS * o], vec![0i64; if wide { ROWS * o } else { 0 }]);
        for block in b..e {
            let r0 = block * ROWS;
            let rows = ROWS.min(r - r0);
            if wide {
                acc64.fill(0);
                block_sums(&mut acc64, xv, wv, table, r0, rows, k, o);
            } else {
                acc32.fill(0);
                block_sums(&mut acc32, xv, wv, table, r0, rows, k, o);
            }
            for i in 0..rows {
                let row = r0 + i;
                let (n, p) = (row / layout.l, row % layout.l);
                for j in 0..o {
                    let at = (n * layout.o_total + layout.o_off + j) * layout.l + p;
                    let v = if wide { acc64[i * o + j] as f32 } else { acc32[i * o + j] as f32 };
                    // SAFETY: each (row, j) maps to its own element; rows belong to one block each.
                    *(base as *mut f32).add(at) = v;
                }
            }
        }
    });
}

/// An accumulator lane: int32 or int64.
trait Acc: Copy + std::ops::AddAssign {
    fn of(v: i32) -> Self;
}
impl Acc for i32 {
    #[inline(always)]
    fn of(v: i32) -> Self {
        v
    }
}
impl Acc for i64 {
    #[inline(always)]
    fn of(v: i32) -> Self {
        v as i64
    }
}

/// Sums of up to ROWS rows starting at `r0` into `acc` (`ROWS * o`).
#[allow(clippy::too_many_arguments)]
fn block_sums<A: Acc>(
    acc: &mut [A],
    xv: &[u8],
    wv: &[u8],
    table: &[i32],
    r0: usize,
    rows: usize,
    k: usize,
    o: usize,
) {
    for kk in 0..k {
        let wk = &wv[kk * o..(kk + 1) * o];
        let row = |i: usize| -> &[i32; 256] {
            let a = xv[(r0 + i) * k + kk] as usize;
            table[a * 256..a * 256 + 256].try_into().expect("256 entries")
        };
        if rows == ROWS {
            let (t0, t1, t2, t3) = (row(0), row(1), row(2), row(3));
            let (a0, rest) = acc.split_at_mut(o);
            let (a1, rest) = rest.split_at_mut(o);
            let (a2, a3) = rest.split_at_mut(o);
            for (j, &w) in wk.iter().enumerate() {
                let w = w as usize;
                a0[j] += A::of(t0[w]);
                a1[j] += A::of(t1[w]);
                a2[j] += A::of(t2[w]);
                a3[j] += A::of(t3[w]);
            }
        } else {
            for i in 0..rows {
                let t = row(i);
                for (a, &w) in acc[i * o..(i + 1) * o].iter_mut().zip(wk) {
                    *a += A::of(t[w as usize]);
                }
            }
        }
    }
}

/// The same sums through libtorch (any device): the table indexed by both operands' bytes, then
/// summed, in chunks of rows so that the index tensor stays under 64 MiB. Refuses what
/// [`lut_matmul`]'s CPU path refuses, with the same errors.
pub fn lut_matmul_gather(x: &Tensor, w: &Tensor, m: &Multiplier) -> Result<Tensor> {
    check_matmul(x, w)?;
    check_int8(x, "the input")?;
    check_int8(w, "the weight")?;
    let device = x.device();
    let (r, k, o) = (x.size()[0], x.size()[1], w.size()[0]);
    let table = Tensor::f_from_slice(m.table())?.f_to_kind(Kind::Int64)?.f_to_device(device)?;
    let idx = |t: &Tensor| -> Result<Tensor> {
        // Two's-complement bytes as indices: v mod 256.
        Ok(t.f_detach()?.f_to_kind(Kind::Int64)?.f_remainder(256)?)
    };
    let (xi, wi) = (idx(x)?, idx(w)?);
    let rows = ((8i64 << 20) / (o * k).max(1)).max(1);
    let mut parts = Vec::new();
    for start in (0..r).step_by(rows as usize) {
        let len = rows.min(r - start);
        let a = xi.f_narrow(0, start, len)?.f_unsqueeze(1)?.f_mul_scalar(256)?; // [len, 1, K]
        let flat = a.f_add(&wi.f_unsqueeze(0)?)?; // [len, O, K]
        let products = table.f_take(&flat)?;
        parts
            .push(products.f_sum_dim_intlist([2i64].as_slice(), false, Kind::Int64)?.f_to_kind(Kind::Float)?);
    }
    if parts.is_empty() {
        return Ok(Tensor::f_zeros([0, o], (Kind::Float, device))?);
    }
    Ok(Tensor::f_cat(&parts, 0)?)
}

/// A Linear layer's table products: `x` `[*, K]`, `w` `[O, K]` (integer values) to `[*, O]`.
pub fn lut_linear(x: &Tensor, w: &Tensor, m: &Multiplier) -> Result<Tensor> {
    if !x.defined() {
        return Err(Error::Undefined("lut_linear input"));
    }
    let size = x.size();
    let k = *size.last().ok_or_else(|| Error::Shape {
        what: "lut_linear input".into(),
        expected: "[*, K]".into(),
        actual: size.clone(),
    })?;
    let y = lut_matmul(&x.f_reshape([-1, k])?, w, m)?;
    let mut out = size[..size.len() - 1].to_vec();
    out.push(w.size()[0]);
    Ok(y.f_reshape(&out)?.f_to_device(x.device())?)
}

/// A Conv2d layer's table products (input `[N, C, H, W]`, weight `[O, C/groups, kh, kw]`):
/// the input's bytes unfolded into rows per group (zeros for padding), one table GEMM per
/// group written straight into the `[N, O, Ho, Wo]` output.
pub fn lut_conv2d(
    x: &Tensor,
    w: &Tensor,
    m: &Multiplier,
    stride: i64,
    padding: i64,
    dilation: i64,
    groups: i64,
) -> Result<Tensor> {
    let geometry =
        Conv2dGeometry { stride: [stride; 2], padding: [padding; 2], dilation: [dilation; 2], groups };
    lut_conv2d_with(x, w, m, geometry)
}

/// A 2-d convolution's geometry; pairs are (height, width).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dGeometry {
    /// Step of the kernel.
    pub stride: [i64; 2],
    /// Zeros on both sides.
    pub padding: [i64; 2],
    /// Spacing of the kernel's taps.
    pub dilation: [i64; 2],
    /// Channel groups.
    pub groups: i64,
}

/// [`lut_conv2d`] with a stride, padding and dilation per dimension (inception's 1x7 kernels
/// with padding (0, 3), a stride of (1, 2)).
pub fn lut_conv2d_with(x: &Tensor, w: &Tensor, m: &Multiplier, geometry: Conv2dGeometry) -> Result<Tensor> {
    let Conv2dGeometry { stride, padding, dilation, groups } = geometry;
    if !x.defined() {
        return Err(Error::Undefined("lut_conv2d input"));
    }
    if !w.defined() {
        return Err(Error::Undefined("lut_conv2d weight"));
    }
    let (xs, ws) = (x.size(), w.size());
    if ws.len() == 4 && (ws[1] == 0 || ws[2] == 0 || ws[3] == 0) {
        return Err(Error::Shape {
            what: "lut_conv2d weight".into(),
            expected: "[O, C/groups, kh, kw] with at least one input channel and a kernel of at least 1x1"
                .into(),
            actual: ws,
        });
    }
    if xs.len() != 4 || ws.len() != 4 || groups < 1 || xs[1] != ws[1] * groups || ws[0] % groups != 0 {
        return Err(Error::Shape {
            what: "lut_conv2d".into(),
            expected: "x [N, C, H, W], w [O, C/groups, kh, kw]".into(),
            actual: [xs, ws].concat(),
        });
    }
    let smallest = stride.iter().chain(&dilation).copied().min().unwrap_or(1);
    if smallest < 1 || padding.iter().any(|&p| p < 0) {
        return Err(Error::Argument {
            what: "convolution geometry",
            value: smallest.min(padding[0].min(padding[1])) as f64,
            expected: "stride and dilation >= 1, padding >= 0",
        });
    }
    let [n, c, h, wd] = [xs[0], xs[1], xs[2], xs[3]].map(|v| v as usize);
    let [o, cg, kh, kw] = [ws[0], ws[1], ws[2], ws[3]].map(|v| v as usize);
    let ([sy, sx], [py, px], [dy, dx]) =
        (stride.map(|v| v as usize), padding.map(|v| v as usize), dilation.map(|v| v as usize));
    let g = groups as usize;
    let span = |size: usize, kernel: usize, s: usize, p: usize, d: usize| {
        (size + 2 * p).checked_sub(d * (kernel - 1) + 1).map(|v| v / s + 1)
    };
    let (Some(ho), Some(wo)) = (span(h, kh, sy, py, dy), span(wd, kw, sx, px, dx)) else {
        return Err(Error::Shape {
            what: "lut_conv2d input".into(),
            expected: "at least the kernel's extent".into(),
            actual: xs,
        });
    };
    if x.device() != Device::Cpu {
        return lut_conv2d_gather(x, w, m, geometry, [ho as i64, wo as i64]);
    }
    let (l, og, kg) = (ho * wo, o / g, cg * kh * kw);
    let (xv, wv) = (to_bytes(x, "the input")?, to_bytes(w, "the weight")?);
    let mut out = Tensor::f_empty([n as i64, o as i64, ho as i64, wo as i64], (Kind::Float, Device::Cpu))?;
    // The direct path takes one stride, padding and dilation for both dimensions.
    if super::direct::worthwhile(g, og) && sy == sx && py == px && dy == dx {
        let (s, p, d) = (sy, py, dy);
        let geometry = super::direct::Geometry {
            n,
            c,
            h,
            w: wd,
            o,
            kh,
            kw,
            stride: s,
            padding: p,
            dilation: d,
            groups: g,
            ho,
            wo,
        };
        // SAFETY: `out` is a fresh contiguous float32 tensor of n * o * ho * wo elements.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, out.numel()) };
        super::direct::conv(&xv, &wv, m, geometry, dst);
        return Ok(out);
    }
    let zero = 0u8; // the byte of 0: padding multiplies through the table like any operand
    let mut rows = vec![0u8; n * l * kg];
    for gi in 0..g {
        for (row, dst) in rows.chunks_mut(kg).enumerate() {
            let (b, pos) = (row / l, row % l);
            let (oy, ox) = (pos / wo, pos % wo);
            let mut i = 0;
            for ic in 0..cg {
                let plane = (b * c + gi * cg + ic) * h * wd;
                for ky in 0..kh {
                    let iy = (oy * sy + ky * dy) as isize - py as isize;
                    for kx in 0..kw {
                        let ix = (ox * sx + kx * dx) as isize - px as isize;
                        dst[i] = if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                            zero
                        } else {
                            xv[plane + iy as usize * wd + ix as usize]
                        };
                        i += 1;
                    }
                }
            }
        }
        let wg = transposed(&wv[gi * og * kg..(gi + 1) * og * kg], og, kg);
        // SAFETY: `out` is the fresh [N, O, Ho, Wo] float tensor; each group writes its own channels.
        unsafe {
            table_gemm(&rows, &wg, n * l, kg, og, m, &mut out, Layout { l, o_total: o, o_off: gi * og })
        };
    }
    Ok(out)
}

/// [`lut_conv2d`] through libtorch's unfold and gathers (any device), for the geometry and
/// output size `[ho, wo]` that it checked.
fn lut_conv2d_gather(
    x: &Tensor,
    w: &Tensor,
    m: &Multiplier,
    geometry: Conv2dGeometry,
    out: [i64; 2],
) -> Result<Tensor> {
    let Conv2dGeometry { stride, padding, dilation, groups } = geometry;
    let [ho, wo] = out;
    let (xs, ws) = (x.size(), w.size());
    let (n, c) = (xs[0], xs[1]);
    let (o, kh, kw) = (ws[0], ws[2], ws[3]);
    let cols = x.f_im2col([kh, kw], dilation, padding, stride)?; // [N, C*kh*kw, L]
    let l = ho * wo;
    let (cg, og) = (c / groups, o / groups);
    let kg = cg * kh * kw;
    let mut outs = Vec::with_capacity(groups as usize);
    for g in 0..groups {
        let xg = cols.f_narrow(1, g * kg, kg)?.f_permute([0, 2, 1])?.f_reshape([n * l, kg])?;
        let wg = w.f_narrow(0, g * og, og)?.f_reshape([og, kg])?;
        let yg = lut_matmul_gather(&xg, &wg, m)?.f_reshape([n, l, og])?.f_permute([0, 2, 1])?;
        outs.push(yg);
    }
    Ok(Tensor::f_cat(&outs, 1)?.f_reshape([n, o, ho, wo])?.f_contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised byte conversion accepts exactly the integers of [-128, 127] and names the
    /// first value that is not one, NaN and the infinities included.
    #[test]
    fn to_bytes_accepts_exactly_the_int8_integers() {
        let good = [-128.0f32, -1.0, -0.0, 0.0, 1.0, 127.0];
        let bytes = to_bytes(&Tensor::from_slice(&good), "x").unwrap();
        assert_eq!(bytes, [128u8, 255, 0, 0, 1, 127]);
        for bad in
            [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 127.5, -128.5, 128.0, -129.0, 1e10, -3e9, 0.25]
        {
            // The bad value after 300 good ones, so it lands in a vectorised stretch.
            let mut v = vec![5.0f32; 300];
            v.push(bad);
            v.extend([7.0; 37]);
            match to_bytes(&Tensor::from_slice(&v), "x") {
                Err(Error::Operand { value, .. }) => {
                    assert!(
                        value.to_bits() == (bad as f64).to_bits() || (bad.is_nan() && value.is_nan()),
                        "{bad}"
                    )
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
