//! The table convolution of grouped and depthwise layers, computed directly: each output
//! plane sums, tap by tap, one table column per weight byte, instead of a GEMM whose rows
//! hold a handful of outputs each (which costs per output, not per lookup).

use super::Multiplier;

/// A convolution's geometry, in elements.
#[derive(Clone, Copy)]
pub(super) struct Geometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub groups: usize,
    pub ho: usize,
    pub wo: usize,
}

/// Whether the direct path beats the table GEMM: few outputs per group (depthwise: one).
pub(super) fn worthwhile(groups: usize, outputs_per_group: usize) -> bool {
    groups > 1 && outputs_per_group <= 8
}

/// `out[b][oc][oy][ox] = sum over the group's channels and taps of table[x byte][w byte]`,
/// with padding read as the byte of 0 (it multiplies through the table like any operand),
/// written as float32 into `out` (`[N, O, Ho, Wo]`, contiguous).
pub(super) fn conv(xv: &[u8], wv: &[u8], m: &Multiplier, g: Geometry, out: &mut [f32]) {
    // Row `w` of the transposed table is every product with weight byte `w`: 1 KiB per tap.
    let table = m.by_weight_table();
    let (cg, og) = (g.c / g.groups, g.o / g.groups);
    let k = cg * g.kh * g.kw;
    let wide = (m.max_abs() as i128) * (k as i128) > i32::MAX as i128;
    let plane = g.ho * g.wo;
    let base = out.as_mut_ptr() as usize;
    // One output row at a time, all taps into it, so its accumulators stay in L1.
    crate::glue::parallel_for(g.n * g.o, 1, |begin, end| {
        let (mut acc, mut acc32) = (vec![0i64; g.wo], vec![0i32; g.wo]);
        for p in begin..end {
            let (b, oc) = (p / g.o, p % g.o);
            let gi = oc / og;
            // SAFETY: plane `p` of the contiguous output is written by this chunk alone.
            let dst = unsafe { std::slice::from_raw_parts_mut((base as *mut f32).add(p * plane), plane) };
            for oy in 0..g.ho {
                let out_row = &mut dst[oy * g.wo..(oy + 1) * g.wo];
                acc.fill(0);
                acc32.fill(0);
                for ic in 0..cg {
                    let x_plane = &xv[((b * g.c + gi * cg + ic) * g.h) * g.w..][..g.h * g.w];
                    for ky in 0..g.kh {
                        let iy = (oy * g.stride + ky * g.dilation) as isize - g.padding as isize;
                        let in_row =
                            (iy >= 0 && iy < g.h as isize).then(|| &x_plane[iy as usize * g.w..][..g.w]);
                        let taps = &wv[((oc * cg + ic) * g.kh + ky) * g.kw..][..g.kw];
                        let row_of = |wb: u8| -> &[i32; 256] {
                            table[wb as usize * 256..][..256].try_into().expect("256 entries")
                        };
                        // The common 3-wide, stride-1 kernel: three taps per pass over the row.
                        if let (false, 3, 1, Some(in_row)) = (wide, g.kw, g.stride, in_row) {
                            taps3(&mut acc32, [row_of(taps[0]), row_of(taps[1]), row_of(taps[2])], in_row, g);
                            continue;
                        }
                        for (kx, &wb) in taps.iter().enumerate() {
                            let row = row_of(wb);
                            if wide {
                                tap(&mut acc, row, in_row, g, kx, |a, v| *a += v as i64);
                            } else {
                                tap(&mut acc32, row, in_row, g, kx, |a, v| *a += v);
                            }
                        }
                    }
                }
                if wide {
                    out_row.iter_mut().zip(&acc).for_each(|(d, &a)| *d = a as f32);
                } else {
                    out_row.iter_mut().zip(&acc32).for_each(|(d, &a)| *d = a as f32);
                }
            }
        }
    });
}

/// Three taps of a stride-1 kernel into an output row in one pass where all three read
/// inside the input row, one tap at a time at the borders.
fn taps3(acc: &mut [i32], rows: [&[i32; 256]; 3], in_row: &[u8], g: Geometry) {
    let w = g.w as isize;
    let offs: [isize; 3] = std::array::from_fn(|k| (k * g.dilation) as isize - g.padding as isize);
    // ox is inside for tap k where 0 <= ox + off_k < w.
    let lo = offs.iter().map(|&o| (-o).max(0)).max().unwrap_or(0).min(g.wo as isize);
    let hi = offs.iter().map(|&o| (w - o).max(0)).min().unwrap_or(0).min(g.wo as isize).max(lo);
    let at = |ox: isize, k: usize| {
        let ix = ox + offs[k];
        rows[k][if ix < 0 || ix >= w { 0 } else { in_row[ix as usize] } as usize]
    };
    for ox in (0..lo).chain(hi..g.wo as isize) {
        acc[ox as usize] += at(ox, 0) + at(ox, 1) + at(ox, 2);
    }
    let (lo, hi) = (lo as usize, hi as usize);
    let s: [&[u8]; 3] = std::array::from_fn(|k| &in_row[(lo as isize + offs[k]) as usize..][..hi - lo]);
    for (((a, &b0), &b1), &b2) in acc[lo..hi].iter_mut().zip(s[0]).zip(s[1]).zip(s[2]) {
        *a += rows[0][b0 as usize] + rows[1][b1 as usize] + rows[2][b2 as usize];
    }
}

/// Adds one tap's products to an output row: `row[x byte at the tap's input position]`, the
/// byte of 0 where the position is padding (`in_row` is `None` for a padded input row).
#[inline(always)]
fn tap<A>(
    acc: &mut [A],
    row: &[i32; 256],
    in_row: Option<&[u8]>,
    g: Geometry,
    kx: usize,
    add: impl Fn(&mut A, i32),
) {
    let Some(in_row) = in_row else {
        acc.iter_mut().for_each(|a| add(a, row[0]));
        return;
    };
    // Output columns whose input column lies inside the row: ox in lo..hi.
    let (s, off) = (g.stride, (kx * g.dilation) as isize - g.padding as isize);
    let lo = if off >= 0 { 0 } else { ((-off) as usize).div_ceil(s) };
    let hi = if (g.w as isize) <= off { 0 } else { ((g.w as isize - off) as usize).div_ceil(s).min(g.wo) };
    let (lo, hi) = (lo.min(hi), hi);
    acc[..lo].iter_mut().for_each(|a| add(a, row[0]));
    acc[hi..].iter_mut().for_each(|a| add(a, row[0]));
    let start = (lo as isize * s as isize + off) as usize;
    if s == 1 {
        for (a, &byte) in acc[lo..hi].iter_mut().zip(&in_row[start..start + (hi - lo)]) {
            add(a, row[byte as usize]);
        }
    } else {
        for (a, &byte) in acc[lo..hi].iter_mut().zip(in_row[start..].iter().step_by(s)) {
            add(a, row[byte as usize]);
        }
    }
}
