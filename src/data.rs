//! MNIST in IDX format (plain or gzipped): loading with clear errors, normalisation, and writing subsets.

use std::io::Read;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// The four IDX files of an MNIST-format folder.
pub const MNIST_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

const IMAGES_MAGIC: u32 = 0x0803;
const LABELS_MAGIC: u32 = 0x0801;

/// An MNIST-format data set: `u8` images `[N, rows, cols]` and `i64` labels `[N]`.
#[derive(Debug)]
pub struct Mnist {
    /// Training images, `[N, rows, cols]`, `u8`.
    pub train_images: Tensor,
    /// Training labels, `[N]`, `i64` in `0..=9`.
    pub train_labels: Tensor,
    /// Test images, `[M, rows, cols]`, `u8`.
    pub test_images: Tensor,
    /// Test labels, `[M]`, `i64` in `0..=9`.
    pub test_labels: Tensor,
}

impl Mnist {
    /// Loads `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
    /// `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte` from `dir`, each plain or `.gz`.
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::Data(format!(
                "MNIST folder {} does not exist or is not a folder",
                dir.display()
            )));
        }
        let read = |name: &str| -> Result<(PathBuf, Vec<u8>)> {
            for candidate in [dir.join(name), dir.join(format!("{name}.gz"))] {
                if candidate.is_file() {
                    let bytes = std::fs::read(&candidate)
                        .map_err(|e| Error::Data(format!("{}: {e}", candidate.display())))?;
                    return Ok((candidate, bytes));
                }
            }
            Err(Error::Data(format!("MNIST folder {}: missing {name} (or {name}.gz)", dir.display())))
        };
        let [a, b, c, d] = MNIST_FILES.map(read);
        let (a, b, c, d) = (a?, b?, c?, d?);
        Self::from_files([(&a.0, &a.1[..]), (&b.0, &b.1[..]), (&c.0, &c.1[..]), (&d.0, &d.1[..])])
    }

    /// Parses the four files' bytes (plain or gzipped), in [`MNIST_FILES`] order;
    /// the names only label error messages.
    pub fn from_bytes(files: [(&str, &[u8]); 4]) -> Result<Self> {
        Self::from_files(files.map(|(n, b)| (Path::new(n), b)))
    }

    fn from_files(files: [(&Path, &[u8]); 4]) -> Result<Self> {
        let [ti, tl, vi, vl] = files;
        let (train_images, train_labels) = (parse_images(ti.0, ti.1)?, parse_labels(tl.0, tl.1)?);
        let (test_images, test_labels) = (parse_images(vi.0, vi.1)?, parse_labels(vl.0, vl.1)?);
        for (imgs, labels, what) in
            [(&train_images, &train_labels, "train"), (&test_images, &test_labels, "t10k")]
        {
            if imgs.size()[0] != labels.size()[0] {
                return Err(Error::Data(format!(
                    "{what} split: {} images but {} labels",
                    imgs.size()[0],
                    labels.size()[0]
                )));
            }
        }
        if train_images.size()[1..] != test_images.size()[1..] {
            return Err(Error::Data(format!(
                "train images are {:?} but test images are {:?}",
                &train_images.size()[1..],
                &test_images.size()[1..]
            )));
        }
        Ok(Self { train_images, train_labels, test_images, test_labels })
    }

    /// The first `n_train` training and `n_test` test digits (all, where fewer).
    pub fn subset(&self, n_train: i64, n_test: i64) -> Self {
        let n = n_train.min(self.train_labels.size()[0]);
        let m = n_test.min(self.test_labels.size()[0]);
        Self {
            train_images: self.train_images.narrow(0, 0, n),
            train_labels: self.train_labels.narrow(0, 0, n),
            test_images: self.test_images.narrow(0, 0, m),
            test_labels: self.test_labels.narrow(0, 0, m),
        }
    }

    /// Writes the four files to `dir` as plain IDX (created if needed).
    pub fn save_dir(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::Data(format!("{}: {e}", dir.display())))?;
        let tensors = [&self.train_images, &self.train_labels, &self.test_images, &self.test_labels];
        for (name, t) in MNIST_FILES.iter().zip(tensors) {
            let path = dir.join(name);
            std::fs::write(&path, idx_bytes(t)?)
                .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
        }
        Ok(())
    }
}

/// Images as float32 `[N, 1, rows, cols]` on `device`: `(pixel / 255 - mean) / std`.
pub fn normalize(images: &Tensor, mean: f64, std: f64, device: Device) -> Result<Tensor> {
    if !(std.is_finite() && std > 0.0) {
        return Err(Error::Argument { what: "std", value: std, expected: "positive and finite" });
    }
    if !mean.is_finite() {
        return Err(Error::Argument { what: "mean", value: mean, expected: "finite" });
    }
    let x = images.f_to_device(device)?.f_to_kind(Kind::Float)?.f_unsqueeze(1)?;
    Ok(((x / 255.0) - mean) / std)
}

fn decompress(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| Error::Data(format!("{}: corrupt gzip data ({e})", path.display())))?;
        Ok(out)
    } else {
        Ok(bytes.to_vec())
    }
}

/// Parses an IDX header: the magic number and the dimensions, checking the payload length.
fn parse_idx(path: &Path, bytes: &[u8], magic: u32, what: &str) -> Result<(Vec<i64>, Vec<u8>)> {
    let data = decompress(path, bytes)?;
    let ndim = (magic & 0xff) as usize;
    let header = 4 + 4 * ndim;
    let be = |i: usize| u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    if data.len() < header || be(0) != magic {
        let found =
            if data.len() >= 4 { format!("{:#010x}", be(0)) } else { format!("{} bytes", data.len()) };
        return Err(Error::Data(format!(
            "{}: not an IDX {what} file (expected magic {magic:#010x}, found {found})",
            path.display()
        )));
    }
    let dims: Vec<i64> = (0..ndim).map(|d| be(4 + 4 * d) as i64).collect();
    let expected = dims.iter().product::<i64>() as usize;
    if data.len() - header != expected {
        return Err(Error::Data(format!(
            "{}: header promises {dims:?} = {expected} bytes of {what} but {} follow (truncated or corrupt)",
            path.display(),
            data.len() - header
        )));
    }
    Ok((dims, data[header..].to_vec()))
}

fn parse_images(path: &Path, bytes: &[u8]) -> Result<Tensor> {
    let (dims, data) = parse_idx(path, bytes, IMAGES_MAGIC, "image")?;
    Ok(Tensor::f_from_slice(&data)?.f_reshape(&dims)?)
}

fn parse_labels(path: &Path, bytes: &[u8]) -> Result<Tensor> {
    let (dims, data) = parse_idx(path, bytes, LABELS_MAGIC, "label")?;
    if let Some(bad) = data.iter().find(|&&l| l > 9) {
        return Err(Error::Data(format!("{}: label {bad} is not a digit 0..=9", path.display())));
    }
    Ok(Tensor::f_from_slice(&data)?.f_reshape(&dims)?.f_to_kind(Kind::Int64)?)
}

fn idx_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let size = t.size();
    let magic = 0x0800u32 | size.len() as u32;
    let mut out = magic.to_be_bytes().to_vec();
    for d in &size {
        out.extend_from_slice(&(*d as u32).to_be_bytes());
    }
    out.extend(Vec::<u8>::try_from(t.f_to_kind(Kind::Uint8)?.f_flatten(0, -1)?)?);
    Ok(out)
}
