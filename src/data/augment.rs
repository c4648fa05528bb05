//! Training-time augmentation: random crops (of a zero-padded image) and horizontal flips.

use tch::{Kind, Tensor};

use crate::Result;

/// Each image of `x` `[N, C, H, W]` shifted by a random crop of its zero-padded self (`pad`
/// pixels on every side) and flipped left-right with probability 1/2, as CIFAR training
/// usually does; the random numbers come from libtorch's generator (`tch::manual_seed`).
pub fn random_crop_flip(x: &Tensor, pad: i64) -> Result<Tensor> {
    let n = x.size().first().copied().unwrap_or(0);
    // A wrong shape is refused by crop_flip, after the draws, as before them.
    let (offsets, flips) = crop_flip_draws(n, pad)?;
    crop_flip(x, pad, &offsets, &flips)
}

/// The random numbers of [`random_crop_flip`] for `n` images: offsets `[n, 2]` in
/// `0..=2 pad` and flips `[n]` in `{0, 1}`, drawn ahead so that batches can be made elsewhere.
pub fn crop_flip_draws(n: i64, pad: i64) -> Result<(Tensor, Tensor)> {
    let offsets = Tensor::f_randint(2 * pad + 1, [n, 2], (Kind::Int64, tch::Device::Cpu))?;
    let flips = Tensor::f_randint(2, [n], (Kind::Int64, tch::Device::Cpu))?;
    Ok((offsets, flips))
}

/// [`random_crop_flip`] with given draws (from [`crop_flip_draws`]).
pub fn crop_flip(x: &Tensor, pad: i64, offsets: &Tensor, flips: &Tensor) -> Result<Tensor> {
    let size = x.size();
    let [n, _, h, w] = size[..] else {
        return Err(crate::Error::Shape {
            what: "augmented images".into(),
            expected: "[N, C, H, W]".into(),
            actual: size,
        });
    };
    if offsets.size() != [n, 2] || flips.size() != [n] {
        return Err(crate::Error::Shape {
            what: "crop offsets and flips".into(),
            expected: format!("[{n}, 2] and [{n}]"),
            actual: [offsets.size(), flips.size()].concat(),
        });
    }
    let padded = x.f_constant_pad_nd([pad, pad, pad, pad])?;
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let (dy, dx) = (offsets.f_int64_value(&[i, 0])?, offsets.f_int64_value(&[i, 1])?);
        let img = padded.f_get(i)?.f_narrow(1, dy, h)?.f_narrow(2, dx, w)?;
        out.push(if flips.f_int64_value(&[i])? == 1 { img.f_flip([2])? } else { img });
    }
    Ok(Tensor::f_stack(&out, 0)?)
}
