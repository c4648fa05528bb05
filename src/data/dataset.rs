//! [`DataSet`]: a training and a test split of `[N, C, H, W]` images with labels, from any
//! of the formats the crate reads, detected from the path.

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::Mnist;
use crate::{Error, Result};

/// One split: `images` `[N, C, H, W]` (`u8` pixels, or floats already in `[0, 1]`) and
/// `labels` `[N]` (`i64`).
#[derive(Debug)]
pub struct ImageSet {
    /// The images.
    pub images: Tensor,
    /// Their classes.
    pub labels: Tensor,
}

impl ImageSet {
    /// How many images.
    pub fn len(&self) -> i64 {
        self.labels.size().first().copied().unwrap_or(0)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// At most `n` images, spread evenly over the split (every k-th), so that a split sorted
    /// by class keeps every class.
    pub fn spread(&self, n: i64) -> Result<Self> {
        let len = self.len();
        if n >= len {
            return Ok(Self { images: self.images.shallow_clone(), labels: self.labels.shallow_clone() });
        }
        let idx: Vec<i64> = (0..n.max(0)).map(|i| i * len / n.max(1)).collect();
        let idx = Tensor::f_from_slice(&idx)?;
        Ok(Self {
            images: self.images.f_index_select(0, &idx)?,
            labels: self.labels.f_index_select(0, &idx)?,
        })
    }
}

/// A data set: its splits, how many classes its labels name, and where it came from.
#[derive(Debug)]
pub struct DataSet {
    /// Training images (calibration and fine-tuning).
    pub train: ImageSet,
    /// Test images (accuracy).
    pub test: ImageSet,
    /// One more than the largest label.
    pub classes: i64,
    /// The file or folder it was read from.
    pub source: PathBuf,
    /// The format: `mnist`, `cifar10`, `cifar100`, `image folder` or `safetensors`.
    pub format: &'static str,
}

/// How [`DataSet::load`] reads image folders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Height and width of each image after resizing and center cropping (image folders).
    pub size: [i64; 2],
    /// The shorter side is resized to this before the center crop; `None`: `size` x 256 / 224,
    /// as torchvision's ImageNet evaluation does.
    pub resize: Option<i64>,
    /// Decoding threads; 0: one per core.
    pub threads: usize,
}

impl Default for LoadOptions {
    /// 224x224 crops of images resized to 256.
    fn default() -> Self {
        Self { size: [224, 224], resize: None, threads: 0 }
    }
}

impl DataSet {
    /// Reads the data set at `path`, detecting its format:
    /// - a folder with MNIST's four IDX files (plain or `.gz`);
    /// - a CIFAR-10 binary folder (`data_batch_1.bin` ... `data_batch_5.bin`, `test_batch.bin`)
    ///   or a CIFAR-100 one (`train.bin`, `test.bin`; fine labels);
    /// - an image folder: `train/` and `val/` (or `test/`) with one subfolder per class, or
    ///   one subfolder per class directly (then both splits are those images); PNG and JPEG,
    ///   classes in sorted order as torchvision's `ImageFolder`;
    /// - a `.safetensors` file with `images` `[N, C, H, W]` (`u8`, or floats in `[0, 1]`) and
    ///   `labels` `[N]` (both splits), or `train_images`, `train_labels`, `test_images`,
    ///   `test_labels`.
    ///
    /// Bad data (truncated records, an unreadable image, an empty class folder, labels
    /// that disagree in number with the images) is an error naming the file.
    pub fn load(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        if path.is_file() || path.extension().is_some_and(|e| e == "safetensors") {
            return super::tensors::load(path);
        }
        if !path.is_dir() {
            crate::files::check_input_file(path, None)?;
        }
        let has = |name: &str| path.join(name).exists() || path.join(format!("{name}.gz")).exists();
        if super::MNIST_FILES.iter().any(|f| has(f)) {
            return Ok(Self::from_mnist(Mnist::load_dir(path)?, path));
        }
        if has("data_batch_1.bin") || has("test_batch.bin") || has("train.bin") {
            return super::cifar::load(path);
        }
        super::folder::load(path, options)
    }

    /// MNIST's digits as `[N, 1, rows, cols]` images.
    pub fn from_mnist(m: Mnist, source: impl AsRef<Path>) -> Self {
        let split = |images: Tensor, labels: Tensor| ImageSet { images: images.unsqueeze(1), labels };
        Self {
            train: split(m.train_images, m.train_labels),
            test: split(m.test_images, m.test_labels),
            classes: 10,
            source: source.as_ref().to_path_buf(),
            format: "mnist",
        }
    }

    /// Checks a split's labels against its images and counts the classes; `what` names the
    /// file in errors.
    pub(super) fn checked(
        train: ImageSet,
        test: ImageSet,
        source: &Path,
        format: &'static str,
    ) -> Result<Self> {
        let fail = |problem: String| Error::DataFile { path: source.to_path_buf(), problem };
        let mut classes = 0;
        for (name, s) in [("training", &train), ("test", &test)] {
            if s.images.dim() != 4 {
                return Err(fail(format!(
                    "{name} images of shape {:?} are not [N, C, H, W]",
                    s.images.size()
                )));
            }
            if s.images.size()[0] != s.len() {
                return Err(fail(format!(
                    "{name} split: {} images but {} labels",
                    s.images.size()[0],
                    s.len()
                )));
            }
            if s.is_empty() {
                return Err(fail(format!("the {name} split holds no images")));
            }
            let (lo, hi) = (s.labels.f_min()?.f_int64_value(&[])?, s.labels.f_max()?.f_int64_value(&[])?);
            if lo < 0 {
                return Err(fail(format!("{name} labels include {lo}: classes are numbered from 0")));
            }
            classes = classes.max(hi + 1);
        }
        if train.images.size()[1..] != test.images.size()[1..] {
            return Err(fail(format!(
                "training images are {:?} but test images {:?}",
                &train.images.size()[1..],
                &test.images.size()[1..]
            )));
        }
        Ok(Self { train, test, classes, source: source.to_path_buf(), format })
    }

    /// Refuses labels a model with `classes` outputs cannot predict, naming the data set.
    pub fn check_classes(&self, classes: i64) -> Result<()> {
        if self.classes > classes {
            return Err(Error::DataFile {
                path: self.source.clone(),
                problem: format!(
                    "its labels go up to {} but the model has {classes} output classes",
                    self.classes - 1
                ),
            });
        }
        Ok(())
    }

    /// The labels as `i64` (formats store bytes or other integers).
    pub(super) fn labels(t: Tensor) -> Result<Tensor> {
        Ok(t.f_to_kind(Kind::Int64)?)
    }
}
