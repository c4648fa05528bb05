//! CIFAR-10 and CIFAR-100 in their binary form: records of label byte(s) and 3072 pixel bytes
//! (32x32, red, green, then blue planes), sizes checked before any record is read.

use std::path::{Path, PathBuf};

use tch::Tensor;

use super::{DataSet, ImageSet};
use crate::{Error, Result};

const PIXELS: usize = 3 * 32 * 32;
/// More than any CIFAR file (30 MB): a larger one is refused before it is read.
const MAX_FILE: u64 = 1 << 30;

/// One split from `files`, each of records `label_bytes + 3072` long; the label is the last
/// label byte (CIFAR-100's fine label).
fn split(files: &[PathBuf], label_bytes: usize) -> Result<ImageSet> {
    let record = label_bytes + PIXELS;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for path in files {
        let size = crate::files::check_input_file(path, Some((MAX_FILE, "a CIFAR batch file")))?;
        if size == 0 || size % record as u64 != 0 {
            return Err(Error::DataFile {
                path: path.clone(),
                problem: format!(
                    "{size} bytes is not a whole number of {record}-byte records (truncated or not CIFAR)"
                ),
            });
        }
        let bytes = std::fs::read(path)
            .map_err(|e| Error::DataFile { path: path.clone(), problem: e.to_string() })?;
        for r in bytes.chunks_exact(record) {
            labels.push(r[label_bytes - 1] as i64);
            pixels.extend_from_slice(&r[label_bytes..]);
        }
    }
    let n = labels.len() as i64;
    Ok(ImageSet {
        images: Tensor::f_from_slice(&pixels)?.f_reshape([n, 3, 32, 32])?,
        labels: Tensor::f_from_slice(&labels)?,
    })
}

/// The CIFAR-10 (`data_batch_*.bin`, `test_batch.bin`) or CIFAR-100 (`train.bin`,
/// `test.bin`) folder `dir`.
pub(super) fn load(dir: &Path) -> Result<DataSet> {
    let missing = |name: &str| Error::DataFile {
        path: dir.to_path_buf(),
        problem: format!("a CIFAR folder without {name}"),
    };
    if dir.join("train.bin").exists() || dir.join("test.bin").exists() {
        let (train, test) = (dir.join("train.bin"), dir.join("test.bin"));
        for (p, name) in [(&train, "train.bin"), (&test, "test.bin")] {
            if !p.exists() {
                return Err(missing(name));
            }
        }
        return DataSet::checked(split(&[train], 2)?, split(&[test], 2)?, dir, "cifar100");
    }
    let train: Vec<PathBuf> =
        (1..=5).map(|i| dir.join(format!("data_batch_{i}.bin"))).filter(|p| p.exists()).collect();
    if train.is_empty() {
        return Err(missing("data_batch_1.bin"));
    }
    let test = dir.join("test_batch.bin");
    if !test.exists() {
        return Err(missing("test_batch.bin"));
    }
    DataSet::checked(split(&train, 1)?, split(&[test], 1)?, dir, "cifar10")
}
