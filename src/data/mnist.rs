//! MNIST in IDX format (plain or gzipped): loading with clear errors, the embedded digits, and writing subsets.

use std::io::Read;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::{Error, MnistProblem, Result};

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
            return Err(Error::MnistFolder { dir: dir.to_path_buf(), missing: None });
        }
        let find = |name: &'static str| -> Result<PathBuf> {
            let found = [dir.join(name), dir.join(format!("{name}.gz"))]
                .into_iter()
                .find(|c| std::fs::symlink_metadata(c).is_ok())
                .ok_or_else(|| Error::MnistFolder { dir: dir.to_path_buf(), missing: Some(name) })?;
            // A folder or FIFO under the name is refused as such, before anything opens it.
            crate::files::check_input_file(&found, None)?;
            Ok(found)
        };
        let [a, b, c, d] = MNIST_FILES.map(find);
        let (a, b, c, d) = (a?, b?, c?, d?);
        let open = |p: &PathBuf| -> Result<(PathBuf, std::fs::File)> {
            let f = std::fs::File::open(p).map_err(|e| read_error(p, "read error", e))?;
            Ok((p.clone(), f))
        };
        let (ti, tl, vi, vl) = (open(&a)?, open(&b)?, open(&c)?, open(&d)?);
        Self::from_readers([
            (&ti.0, Box::new(ti.1)),
            (&tl.0, Box::new(tl.1)),
            (&vi.0, Box::new(vi.1)),
            (&vl.0, Box::new(vl.1)),
        ])
    }

    /// The 10,000 MNIST digits embedded in the crate (1.6 MB of gzip): 8,000 training and
    /// 2,000 test digits of 28×28 pixels; provenance and licence in
    /// `examples/data/mnist-10k/README.md`.
    ///
    /// ```
    /// let m = torchapprox::data::Mnist::embedded()?;
    /// assert_eq!(m.train_images.size(), [8000, 28, 28]);
    /// assert_eq!(m.test_labels.size(), [2000]);
    /// # Ok::<(), torchapprox::Error>(())
    /// ```
    pub fn embedded() -> Result<Self> {
        macro_rules! file {
            ($name:literal) => {
                (
                    concat!("embedded ", $name),
                    &include_bytes!(concat!("../../examples/data/mnist-10k/", $name))[..],
                )
            };
        }
        Self::from_bytes([
            file!("train-images-idx3-ubyte.gz"),
            file!("train-labels-idx1-ubyte.gz"),
            file!("t10k-images-idx3-ubyte.gz"),
            file!("t10k-labels-idx1-ubyte.gz"),
        ])
    }

    /// Parses the four files' bytes (plain or gzipped), in [`MNIST_FILES`] order;
    /// the names only label error messages.
    pub fn from_bytes(files: [(&str, &[u8]); 4]) -> Result<Self> {
        let [a, b, c, d] = files.map(|(n, bytes)| (Path::new(n), Box::new(bytes) as Box<dyn Read + '_>));
        Self::from_readers([a, b, c, d])
    }

    fn from_readers(files: [(&Path, Box<dyn Read + '_>); 4]) -> Result<Self> {
        let [ti, tl, vi, vl] = files;
        // All four headers first: counts that disagree are refused before any payload is read.
        let ti = idx_header(ti.0, ti.1, IMAGES_MAGIC, "image")?;
        let tl = idx_header(tl.0, tl.1, LABELS_MAGIC, "label")?;
        let vi = idx_header(vi.0, vi.1, IMAGES_MAGIC, "image")?;
        let vl = idx_header(vl.0, vl.1, LABELS_MAGIC, "label")?;
        for (imgs, labels, what) in [(&ti, &tl, "train"), (&vi, &vl, "t10k")] {
            if imgs.dims[0] != labels.dims[0] {
                return Err(Error::MnistSplit { split: what, images: imgs.dims[0], labels: labels.dims[0] });
            }
        }
        let (train_images, train_labels) = (parse_images(ti)?, parse_labels(tl)?);
        let (test_images, test_labels) = (parse_images(vi)?, parse_labels(vl)?);
        if train_images.size()[1..] != test_images.size()[1..] {
            return Err(Error::MnistShapes {
                train: train_images.size()[1..].to_vec(),
                test: test_images.size()[1..].to_vec(),
            });
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
        std::fs::create_dir_all(dir).map_err(|e| Error::Output {
            path: dir.to_path_buf(),
            problem: crate::files::OutputProblem::Io(e.to_string()),
        })?;
        let tensors = [&self.train_images, &self.train_labels, &self.test_images, &self.test_labels];
        for (name, t) in MNIST_FILES.iter().zip(tensors) {
            let path = dir.join(name);
            crate::files::write_bytes_atomic(&path, &[], &idx_bytes(t)?)?;
        }
        Ok(())
    }
}

/// Plain bytes, or the gunzipped stream (every member of a multi-member gzip) where the data starts with gzip's magic.
fn decompressed<'a>(path: &Path, mut r: Box<dyn Read + 'a>) -> Result<Box<dyn Read + 'a>> {
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        match r.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_error(path, "read error", e)),
        }
    }
    let whole = std::io::Cursor::new(magic[..got].to_vec()).chain(r);
    Ok(if got == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(whole))
    } else {
        Box::new(whole)
    })
}

/// An IDX file whose header is read and checked, its payload not yet.
struct Idx<'a> {
    path: &'a Path,
    reader: Box<dyn Read + 'a>,
    dims: Vec<i64>,
    expected: u64,
    what: &'static str,
}

fn idx_io_error(path: &Path, e: std::io::Error) -> Error {
    let kind = if e.kind() == std::io::ErrorKind::InvalidInput || e.kind() == std::io::ErrorKind::InvalidData
    {
        "corrupt gzip data"
    } else {
        "read error"
    };
    read_error(path, kind, e)
}

fn read_error(path: &Path, kind: &'static str, e: std::io::Error) -> Error {
    Error::Mnist { path: path.to_path_buf(), problem: MnistProblem::Read { kind, error: e.to_string() } }
}

/// Reads an IDX header (magic number, dimensions) and nothing more, so that both files of a
/// split can be compared before either payload is read.
fn idx_header<'a>(
    path: &'a Path,
    reader: Box<dyn Read + 'a>,
    magic: u32,
    what: &'static str,
) -> Result<Idx<'a>> {
    let io = |e| idx_io_error(path, e);
    let mut r = decompressed(path, reader)?;
    let ndim = (magic & 0xff) as usize;
    let mut header = vec![0u8; 4 + 4 * ndim];
    let got = read_full(&mut r, &mut header).map_err(io)?;
    let be = |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    if got < header.len() || be(0) != magic {
        let found = if got >= 4 { format!("{:#010x}", be(0)) } else { format!("{got} bytes") };
        return Err(Error::Mnist {
            path: path.to_path_buf(),
            problem: MnistProblem::Magic { what, expected: magic, found },
        });
    }
    let dims: Vec<i64> = (0..ndim).map(|d| be(4 + 4 * d) as i64).collect();
    let expected = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&n| n <= isize::MAX as u64)
        .ok_or_else(|| Error::Mnist {
            path: path.to_path_buf(),
            problem: MnistProblem::Overflow { what, dims: dims.clone() },
        })?;
    Ok(Idx { path, reader: r, dims, expected, what })
}

/// Reads exactly the payload `idx`'s header promises: memory never exceeds what the header
/// announces, and a longer or shorter payload is refused.
fn idx_payload(idx: Idx<'_>) -> Result<(Vec<i64>, Vec<u8>)> {
    let Idx { path, mut reader, dims, expected, what } = idx;
    let r = &mut reader;
    let io = |e| idx_io_error(path, e);
    // Grows with the data actually present, so a lying header cannot make us allocate.
    let mut data = Vec::with_capacity(expected.min(1 << 26) as usize);
    r.take(expected).read_to_end(&mut data).map_err(io)?;
    let mut extra = [0u8; 1];
    let more = read_full(r, &mut extra).map_err(io)?;
    if data.len() as u64 != expected || more > 0 {
        let found = if more > 0 { "more follow".to_string() } else { format!("{} follow", data.len()) };
        return Err(Error::Mnist {
            path: path.to_path_buf(),
            problem: MnistProblem::Payload { what, dims, expected, found },
        });
    }
    Ok((dims, data))
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn parse_images(idx: Idx<'_>) -> Result<Tensor> {
    let (dims, data) = idx_payload(idx)?;
    Ok(Tensor::f_from_slice(&data)?.f_reshape(&dims)?)
}

fn parse_labels(idx: Idx<'_>) -> Result<Tensor> {
    let path = idx.path;
    let (dims, data) = idx_payload(idx)?;
    if let Some(bad) = data.iter().find(|&&l| l > 9) {
        return Err(Error::Mnist { path: path.to_path_buf(), problem: MnistProblem::Label(*bad) });
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
