//! Table GEMMs: Linear and Conv2d whose every 8-bit product comes from a [`Multiplier`]'s table.

use tch::{Device, Kind, Tensor};

use super::Multiplier;
use crate::{Error, Result};

/// Rows per block: each weight index loaded serves this many table rows.
const ROWS: usize = 4;

/// Integer-valued float tensor in `[-128, 127]` as contiguous int8 bytes.
fn bytes_of(t: &Tensor, what: &str) -> Result<Tensor> {
    let t = t.f_detach()?.f_to_device(Device::Cpu)?;
    let (lo, hi) = (t.f_min()?.f_double_value(&[])?, t.f_max()?.f_double_value(&[])?);
    if t.numel() > 0 && !(lo >= -128.0 && hi <= 127.0) {
        return Err(Error::Multiplier(format!(
            "{what} holds values in [{lo}, {hi}]: approximate products need 8-bit integers"
        )));
    }
    Ok(t.f_to_kind(Kind::Int8)?.f_contiguous()?)
}

/// `out[r][o] = sum_k table[x[r][k]][w[o][k]]` for int8 `x` `[R, K]` and `w` `[O, K]`, exactly
/// (int32 sums where the table's range allows, int64 otherwise), as float32 `[R, O]`.
///
/// CPU: a blocked table GEMM on libtorch's threads (the transposed weight's bytes index the
/// rows of the table that `x` selects, four rows of `x` per weight load). Elsewhere: libtorch
/// gathers in bounded chunks.
pub fn lut_matmul(x: &Tensor, w: &Tensor, m: &Multiplier) -> Result<Tensor> {
    let (xs, ws) = (x.size(), w.size());
    if xs.len() != 2 || ws.len() != 2 || xs[1] != ws[1] {
        return Err(Error::Shape {
            what: "lut_matmul".into(),
            expected: "x [R, K] and w [O, K]".into(),
            actual: [xs, ws].concat(),
        });
    }
    let device = x.device();
    if device != Device::Cpu {
        return lut_matmul_gather(x, w, m);
    }
    let (r, k, o) = (xs[0] as usize, xs[1] as usize, ws[0] as usize);
    let xb = bytes_of(x, "the input")?;
    let wt = bytes_of(w, "the weight")?.f_t_()?.f_contiguous()?; // [K, O]
                                                                 // SAFETY: contiguous int8 CPU tensors of r*k and k*o elements, alive for the whole call.
    let xv = unsafe { std::slice::from_raw_parts(xb.data_ptr() as *const u8, r * k) };
    let wv = unsafe { std::slice::from_raw_parts(wt.data_ptr() as *const u8, k * o) };
    let out = Tensor::f_zeros([r as i64, o as i64], (Kind::Float, Device::Cpu))?;
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
                // SAFETY: row r0 + i of `out` belongs to this block alone.
                let dst = unsafe { std::slice::from_raw_parts_mut((base as *mut f32).add((r0 + i) * o), o) };
                if wide {
                    dst.iter_mut().zip(&acc64[i * o..(i + 1) * o]).for_each(|(d, &s)| *d = s as f32);
                } else {
                    dst.iter_mut().zip(&acc32[i * o..(i + 1) * o]).for_each(|(d, &s)| *d = s as f32);
                }
            }
        }
    });
    Ok(out)
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
/// summed, in chunks of rows so that the index tensor stays under 64 MiB.
pub fn lut_matmul_gather(x: &Tensor, w: &Tensor, m: &Multiplier) -> Result<Tensor> {
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

/// A Conv2d layer's table products (input `[N, C, H, W]`, weight `[O, C/groups, kh, kw]`),
/// through unfolding, one table GEMM per group.
pub fn lut_conv2d(
    x: &Tensor,
    w: &Tensor,
    m: &Multiplier,
    stride: i64,
    padding: i64,
    dilation: i64,
    groups: i64,
) -> Result<Tensor> {
    let (xs, ws) = (x.size(), w.size());
    if xs.len() != 4 || ws.len() != 4 || groups < 1 || xs[1] != ws[1] * groups || ws[0] % groups != 0 {
        return Err(Error::Shape {
            what: "lut_conv2d".into(),
            expected: "x [N, C, H, W], w [O, C/groups, kh, kw]".into(),
            actual: [xs, ws].concat(),
        });
    }
    let (n, c, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
    let (o, kh, kw) = (ws[0], ws[2], ws[3]);
    let ho = (h + 2 * padding - dilation * (kh - 1) - 1) / stride + 1;
    let wo = (wd + 2 * padding - dilation * (kw - 1) - 1) / stride + 1;
    let cols = x.f_im2col([kh, kw], [dilation, dilation], [padding, padding], [stride, stride])?; // [N, C*kh*kw, L]
    let l = ho * wo;
    let (cg, og) = (c / groups, o / groups);
    let kg = cg * kh * kw;
    let mut outs = Vec::with_capacity(groups as usize);
    for g in 0..groups {
        let xg = cols.f_narrow(1, g * kg, kg)?.f_permute([0, 2, 1])?.f_reshape([n * l, kg])?;
        let wg = w.f_narrow(0, g * og, og)?.f_reshape([og, kg])?;
        let yg = lut_matmul(&xg, &wg, m)?.f_reshape([n, l, og])?.f_permute([0, 2, 1])?;
        outs.push(yg);
    }
    Ok(Tensor::f_cat(&outs, 1)?.f_reshape([n, o, ho, wo])?.f_contiguous()?.f_to_device(x.device())?)
}
