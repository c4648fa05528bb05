//! Data sets: MNIST in IDX format (plain or gzipped, and the embedded 10,000 digits),
//! CIFAR-10/100 binary folders, image folders (one subfolder per class, PNG or JPEG) and
//! safetensors files of images and labels, each as a [`DataSet`] of `[N, C, H, W]` images
//! with labels; normalisation (per channel), augmentation and accuracy counts.
//!
//! One job per file: `mnist` parses IDX, `cifar` the CIFAR records, `folder` decodes image
//! folders, `tensors` reads safetensors, `dataset` detects the format and holds the splits,
//! `augment` makes random crops and flips, `prefetch` prepares batches in the background.

mod augment;
mod cifar;
mod dataset;
mod folder;
mod mnist;
mod prefetch;
mod tensors;

use tch::{Device, Kind, Tensor};

pub use augment::{crop_flip, crop_flip_draws, random_crop_flip};
pub use dataset::{DataSet, ImageSet, LoadOptions};
pub use mnist::{Mnist, MNIST_FILES};
pub use prefetch::prefetched;

use crate::Result;

/// How many of `images` get their arg-max logit equal to `labels`, running `forward` on
/// batches of `batch_size` (at least 1) without gradients; the labels follow the logits'
/// device.
pub fn count_correct(
    images: &Tensor,
    labels: &Tensor,
    batch_size: i64,
    mut forward: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<i64> {
    let _guard = tch::no_grad_guard();
    let (n, batch) = (labels.size()[0], batch_size.max(1));
    let mut correct = 0;
    for start in (0..n).step_by(batch as usize) {
        let len = batch.min(n - start);
        let logits = forward(&images.f_narrow(0, start, len)?)?;
        let labels = labels.f_narrow(0, start, len)?.f_to_device(logits.device())?;
        correct += logits.f_argmax(-1, false)?.f_eq_tensor(&labels)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    }
    Ok(correct)
}

/// Images as float32 `[N, 1, rows, cols]` on `device`: `(pixel / 255 - mean) / std`.
pub fn normalize(images: &Tensor, mean: f64, std: f64, device: Device) -> Result<Tensor> {
    crate::args::check_positive("std", std)?;
    crate::args::check_f32("mean", mean)?;
    let x = images.f_to_device(device)?.f_to_kind(Kind::Float)?.f_unsqueeze(1)?;
    Ok(((x / 255.0) - mean) / std)
}

/// Images `[N, C, H, W]` (`u8` pixels, or floats already in `[0, 1]`) as float32 on `device`:
/// `(pixel / 255 - mean[c]) / std[c]`, where `mean` and `std` hold one value for every
/// channel or one per channel.
pub fn normalize_channels(images: &Tensor, mean: &[f64], std: &[f64], device: Device) -> Result<Tensor> {
    let c = images.size().get(1).copied().unwrap_or(0);
    let per_channel = |what: &'static str, v: &[f64]| -> Result<Tensor> {
        if v.len() != 1 && v.len() as i64 != c {
            return Err(crate::Error::Argument {
                what,
                value: v.len() as f64,
                expected: "one value, or one per image channel",
            });
        }
        Ok(Tensor::f_from_slice(v)?.f_to_kind(Kind::Float)?.f_to_device(device)?.f_reshape([1, -1, 1, 1])?)
    };
    for &s in std {
        crate::args::check_positive("std", s)?;
    }
    for &m in mean {
        crate::args::check_f32("mean", m)?;
    }
    let (mean, std) = (per_channel("mean values", mean)?, per_channel("std values", std)?);
    let x = images.f_to_device(device)?;
    let x =
        if x.kind() == Kind::Uint8 { x.f_to_kind(Kind::Float)? / 255.0 } else { x.f_to_kind(Kind::Float)? };
    Ok(x.f_sub(&mean)?.f_div(&std)?)
}
