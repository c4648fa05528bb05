//! A data set in one safetensors file: `images` and `labels` (both splits), or
//! `train_images`, `train_labels`, `test_images` and `test_labels`; the header is checked
//! before any payload is read.

use std::path::Path;

use tch::Kind;

use super::{DataSet, ImageSet};
use crate::{Error, Result};

pub(super) fn load(path: &Path) -> Result<DataSet> {
    let tensors = crate::files::read_safetensors(path)?;
    let fail = |problem: String| Error::DataFile { path: path.to_path_buf(), problem };
    let get = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
    let split = |prefix: &str| -> Result<Option<ImageSet>> {
        let (images, labels) = (get(&format!("{prefix}images")), get(&format!("{prefix}labels")));
        match (images, labels) {
            (None, None) => Ok(None),
            (Some(images), Some(labels)) => {
                if !matches!(images.kind(), Kind::Uint8 | Kind::Float | Kind::Double | Kind::Half) {
                    return Err(fail(format!(
                        "{prefix}images are {:?}: expected u8 or float",
                        images.kind()
                    )));
                }
                if labels.dim() != 1 || labels.is_floating_point() {
                    return Err(fail(format!(
                        "{prefix}labels of shape {:?} ({:?}) are not a 1-d integer tensor",
                        labels.size(),
                        labels.kind()
                    )));
                }
                let images =
                    if images.kind() == Kind::Uint8 { images } else { images.f_to_kind(Kind::Float)? };
                if images.is_floating_point() && images.numel() > 0 {
                    let finite = images.f_isfinite()?.f_all()?.f_int64_value(&[])? == 1;
                    if !finite {
                        return Err(fail(format!("{prefix}images hold NaN or infinite values")));
                    }
                    let (lo, hi) =
                        (images.f_min()?.f_double_value(&[])?, images.f_max()?.f_double_value(&[])?);
                    if lo < 0.0 || hi > 1.0 {
                        return Err(fail(format!(
                            "{prefix}images hold values from {lo} to {hi}: float images must be pixel / 255, in [0, 1] (or store u8 pixels)"
                        )));
                    }
                }
                Ok(Some(ImageSet { images, labels: DataSet::labels(labels)? }))
            }
            _ => Err(fail(format!("it needs both {prefix}images and {prefix}labels"))),
        }
    };
    let (train, test) = match (split("train_")?, split("test_")?, split("")?) {
        (Some(train), Some(test), _) => (train, test),
        (None, None, Some(both)) => {
            let copy = ImageSet { images: both.images.shallow_clone(), labels: both.labels.shallow_clone() };
            (both, copy)
        }
        _ => {
            return Err(fail(
                "expected `images` and `labels`, or `train_images`, `train_labels`, `test_images` and `test_labels`"
                    .into(),
            ))
        }
    };
    DataSet::checked(train, test, path, "safetensors")
}
