//! Training-time augmentation: random crops (of a zero-padded image) and horizontal flips.

use tch::{Kind, Tensor};

use crate::Result;

/// Each image of `x` `[N, C, H, W]` shifted by a random crop of its zero-padded self (`pad`
/// pixels on every side) and flipped left-right with probability 1/2, as CIFAR training
/// usually does; the random numbers come from libtorch's generator (`tch::manual_seed`).
pub fn random_crop_flip(x: &Tensor, pad: i64) -> Result<Tensor> {
    let size = x.size();
    let [n, _, h, w] = size[..] else {
        return Err(crate::Error::Shape {
            what: "augmented images".into(),
            expected: "[N, C, H, W]".into(),
            actual: size,
        });
    };
    let padded = x.f_constant_pad_nd([pad, pad, pad, pad])?;
    let offsets = Tensor::f_randint(2 * pad + 1, [n, 2], (Kind::Int64, tch::Device::Cpu))?;
    let flips = Tensor::f_randint(2, [n], (Kind::Int64, tch::Device::Cpu))?;
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let (dy, dx) = (offsets.f_int64_value(&[i, 0])?, offsets.f_int64_value(&[i, 1])?);
        let img = padded.f_get(i)?.f_narrow(1, dy, h)?.f_narrow(2, dx, w)?;
        out.push(if flips.f_int64_value(&[i])? == 1 { img.f_flip([2])? } else { img });
    }
    Ok(Tensor::f_stack(&out, 0)?)
}
