//! `Multiplier`: an 8-bit signed multiplier as a 256×256 table of products, built in or loaded from a file.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use crate::{Error, Result};

/// Operands of a table: signed 8-bit integers, indexed by their two's-complement byte.
pub const TABLE_SIZE: usize = 256 * 256;

/// The largest table file read: 65,536 int64 values and up to 64 KiB of `.npy` header.
const MAX_TABLE_FILE: u64 = (TABLE_SIZE as u64) * 8 + (64 << 10);

/// An approximate (or exact) signed 8-bit multiplier: `product(a, b)` for `a, b` in `-128..=127`,
/// stored as TorchApprox stores it, `lut[a as u8][b as u8]`.
///
/// ```
/// use torchapprox::approx::Multiplier;
///
/// let m: Multiplier = "truncated:4".parse()?;
/// assert_eq!(m.product(13, -11), -128); // 143 with its 4 lowest bits dropped
/// let metrics = m.metrics();
/// assert_eq!(metrics.worst_case_error, 15);
/// assert!(metrics.error_rate > 0.5);
/// # Ok::<(), torchapprox::Error>(())
/// ```
#[derive(Clone)]
pub struct Multiplier {
    name: String,
    table: Arc<Vec<i32>>,
    max_abs: i64,
    /// The table indexed `[weight][activation]`, built on first use and shared by clones, so
    /// that grouped convolutions do not transpose 65,536 entries per call.
    by_weight: Arc<OnceLock<Vec<i32>>>,
}

impl PartialEq for Multiplier {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.table == other.table
    }
}

impl Eq for Multiplier {}

impl fmt::Debug for Multiplier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Multiplier({})", self.name)
    }
}

fn index(a: i32, b: i32) -> usize {
    (a as i8 as u8 as usize) * 256 + (b as i8 as u8 as usize)
}

fn parameter(spec: String, expected: &str) -> Error {
    Error::MultiplierParameter { spec, expected: expected.to_string() }
}

impl Multiplier {
    /// A multiplier from `product(a, b)` over all signed 8-bit pairs.
    pub fn from_fn(name: impl Into<String>, mut product: impl FnMut(i32, i32) -> i64) -> Result<Self> {
        let name = name.into();
        let mut table = vec![0i32; TABLE_SIZE];
        for a in -128..=127 {
            for b in -128..=127 {
                let p = product(a, b);
                table[index(a, b)] = i32::try_from(p).map_err(|_| Error::ProductOverflow {
                    name: name.clone(),
                    a,
                    b,
                    product: p,
                })?;
            }
        }
        Ok(Self::new(name, table))
    }

    fn new(name: String, table: Vec<i32>) -> Self {
        let max_abs = table.iter().map(|v| (*v as i64).abs()).max().unwrap_or(0);
        Self { name, table: Arc::new(table), max_abs, by_weight: Arc::default() }
    }

    /// The exact product.
    pub fn exact() -> Self {
        Self::from_fn("exact", |a, b| (a * b) as i64).expect("8-bit products fit")
    }

    /// The exact product with the `k` lowest bits of its magnitude dropped (`k` in `0..=14`).
    pub fn truncated(k: u32) -> Result<Self> {
        if k > 14 {
            return Err(parameter(format!("truncated:{k}"), "in 0..=14 (a product has 15 magnitude bits)"));
        }
        Self::from_fn(format!("truncated:{k}"), |a, b| {
            let m = ((a * b).unsigned_abs() >> k) << k;
            if a * b < 0 {
                -(m as i64)
            } else {
                m as i64
            }
        })
    }

    /// Mitchell's logarithmic multiplier (1962) on the magnitudes: `2^(k1+k2) (1 + x1 + x2)`
    /// where `x1 + x2 < 1`, else `2^(k1+k2+1) (x1 + x2)`, with `|a| = 2^k1 (1 + x1)`.
    pub fn mitchell() -> Self {
        Self::from_fn("mitchell", |a, b| {
            let (p, q) = (a.unsigned_abs(), b.unsigned_abs());
            if p == 0 || q == 0 {
                return 0;
            }
            let (k1, k2) = (31 - p.leading_zeros(), 31 - q.leading_zeros());
            let (m1, m2) = (p - (1 << k1), q - (1 << k2));
            // 2^(k1+k2) (x1 + x2), exactly, in integers.
            let s = (m1 << k2) + (m2 << k1);
            let m = if s < 1 << (k1 + k2) { (1u32 << (k1 + k2)) + s } else { 2 * s };
            if (a < 0) != (b < 0) {
                -(m as i64)
            } else {
                m as i64
            }
        })
        .expect("Mitchell's products fit")
    }

    /// DRUM (Hashemi, Bahar and Reda, 2015): each magnitude of more than `k` bits keeps its
    /// `k` leading bits, the lowest of them forced to 1 (unbiasing), the rest zero; `k` in `2..=7`.
    pub fn drum(k: u32) -> Result<Self> {
        if !(2..=7).contains(&k) {
            return Err(parameter(format!("drum:{k}"), "in 2..=7"));
        }
        let keep = move |v: u32| {
            if v == 0 {
                return 0;
            }
            let t = 31 - v.leading_zeros(); // position of the leading one
            if t < k {
                v
            } else {
                let shift = t + 1 - k;
                ((v >> shift) | 1) << shift
            }
        };
        Self::from_fn(format!("drum:{k}"), move |a, b| {
            let m = keep(a.unsigned_abs()) * keep(b.unsigned_abs());
            if (a < 0) != (b < 0) {
                -(m as i64)
            } else {
                m as i64
            }
        })
    }

    /// Loads a table: `.npy` of int32 or int64, shape `[256, 256]` (as numpy writes it), or
    /// any other file as 65,536 little-endian int32 values. Values must fit int32.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let fail = |problem: String| Error::MultiplierTable { path: path.to_path_buf(), problem };
        // Sized before reading: a table is 65,536 values of at most 8 bytes behind a small header.
        crate::files::check_input_file(path, Some((MAX_TABLE_FILE, "a multiplier table"))).map_err(|e| {
            match e {
                Error::InputFile { problem, .. } => fail(problem.to_string()),
                e => e,
            }
        })?;
        let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        let name = path.display().to_string();
        let values: Vec<i64> = if bytes.starts_with(b"\x93NUMPY") {
            let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| {
                fail(format!("not a readable .npy file ({})", crate::files::one_line(&e.to_string())))
            })?;
            let shape = npy.shape().to_vec();
            if shape != [256, 256] {
                return Err(fail(format!("shape {shape:?}, expected [256, 256]")));
            }
            if npy.order() != npyz::Order::C {
                return Err(fail("Fortran order; save it in C order".into()));
            }
            let dtype = npy.dtype();
            let descr = match &dtype {
                npyz::DType::Plain(t) => t.to_string(),
                other => return Err(fail(format!("dtype {other:?}, expected int32 or int64"))),
            };
            match descr.as_str() {
                "<i4" | "|i4" => npy
                    .into_vec::<i32>()
                    .map_err(|e| {
                        fail(format!(
                            "truncated or corrupt data ({})",
                            crate::files::one_line(&e.to_string())
                        ))
                    })?
                    .into_iter()
                    .map(i64::from)
                    .collect(),
                "<i8" | "|i8" => npy.into_vec::<i64>().map_err(|e| {
                    fail(format!("truncated or corrupt data ({})", crate::files::one_line(&e.to_string())))
                })?,
                other => return Err(fail(format!("dtype {other}, expected int32 or int64 (<i4, <i8)"))),
            }
        } else {
            if bytes.len() != TABLE_SIZE * 4 {
                return Err(fail(format!(
                    "{} bytes: a raw table is 65,536 little-endian int32 values (262,144 bytes), or use .npy",
                    bytes.len()
                )));
            }
            bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()
        };
        if values.len() != TABLE_SIZE {
            return Err(fail(format!("{} values, expected 65,536", values.len())));
        }
        let mut table = Vec::with_capacity(TABLE_SIZE);
        for (i, &v) in values.iter().enumerate() {
            let v = i32::try_from(v)
                .map_err(|_| fail(format!("entry [{}][{}] = {v} does not fit int32", i / 256, i % 256)))?;
            table.push(v);
        }
        Ok(Self::new(name, table))
    }

    /// The same multiplier with its operands swapped: the result's `product(a, b)` is this
    /// one's `product(b, a)`, and its name gains `:wx` (or loses it).
    ///
    /// A layer reads its multiplier as `table[activation][weight]`, as TorchApprox's Linear
    /// does; TorchApprox's Conv2d reads `table[weight][activation]`. For a table that is not
    /// symmetric, `transposed()` (or the spec suffix `:wx`) reproduces that order.
    ///
    /// ```
    /// use torchapprox::approx::Multiplier;
    ///
    /// let m = Multiplier::from_fn("a+ab", |a, b| (a * b + a) as i64)?;
    /// let t = m.transposed();
    /// assert_eq!((m.product(3, 5), t.product(5, 3)), (18, 18));
    /// assert_eq!(t.name(), "a+ab:wx");
    /// assert_eq!(t.transposed(), m);
    /// # Ok::<(), torchapprox::Error>(())
    /// ```
    pub fn transposed(&self) -> Self {
        let table = self.by_weight_table().to_vec();
        let name = match self.name.strip_suffix(":wx") {
            Some(base) => base.to_string(),
            None => format!("{}:wx", self.name),
        };
        Self::new(name, table)
    }

    /// One of EvoApproxLib's 8x8 multipliers by name (`mul8s_1KV8`, `mul8u_2V0`), built in;
    /// see [`catalogue`](Self::catalogue) for the names and their published figures.
    ///
    /// ```
    /// use torchapprox::approx::Multiplier;
    ///
    /// let m = Multiplier::evoapprox("mul8s_1KV6")?; // EvoApprox's exact signed multiplier
    /// assert_eq!(m.product(-7, 9), -63);
    /// let cheaper = Multiplier::evoapprox("mul8s_1KV9")?;
    /// assert!(cheaper.metrics().error_rate > 0.5);
    /// # Ok::<(), torchapprox::Error>(())
    /// ```
    pub fn evoapprox(name: &str) -> Result<Self> {
        let entry = super::evoapprox::entry(name)?;
        Ok(Self::new(entry.name.clone(), super::evoapprox::table(entry)))
    }

    /// EvoApproxLib's built-in multipliers with their published power, area, delay and error
    /// figures, signed ones first.
    pub fn catalogue() -> &'static [super::CatalogueEntry] {
        super::evoapprox::catalogue()
    }

    /// The table as a `.npy` file of int32 `[256, 256]` in TorchApprox's layout (row = the
    /// first operand's two's-complement byte), as numpy's `np.save` writes it.
    pub fn to_npy(&self) -> Vec<u8> {
        let dict = "{'descr': '<i4', 'fortran_order': False, 'shape': (256, 256), }";
        let mut header = dict.to_string();
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(header.len() as u16).to_le_bytes());
        b.extend_from_slice(header.as_bytes());
        b.extend(self.table.iter().flat_map(|v| v.to_le_bytes()));
        b
    }

    /// The spec or file it came from (`exact`, `drum:4`, a path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The table's product of `a` and `b` (two's-complement bytes of any `i32` are used).
    pub fn product(&self, a: i32, b: i32) -> i32 {
        self.table[index(a, b)]
    }

    /// The table, `table[a as u8 * 256 + b as u8]`.
    pub fn table(&self) -> &[i32] {
        &self.table
    }

    /// The table indexed `[weight byte][activation byte]` (this table transposed), computed
    /// once per multiplier and shared by its clones.
    pub(crate) fn by_weight_table(&self) -> &[i32] {
        self.by_weight.get_or_init(|| {
            let mut t = vec![0i32; TABLE_SIZE];
            for i in 0..256 {
                for j in 0..256 {
                    t[j * 256 + i] = self.table[i * 256 + j];
                }
            }
            t
        })
    }

    /// The largest magnitude in the table (decides whether sums fit int32).
    pub fn max_abs(&self) -> i64 {
        self.max_abs
    }

    /// Error metrics over all 65,536 operand pairs, as EvoApprox defines them.
    pub fn metrics(&self) -> MultiplierMetrics {
        let pairs = (-128..=127i32).flat_map(|a| (-128..=127i32).map(move |b| (a, b)));
        error_metrics(pairs.map(|(a, b)| ((a * b) as i64, self.product(a, b) as i64)))
    }
}

/// EvoApprox's error metrics of `(exact, approximate)` products over an operand domain.
pub(crate) fn error_metrics(pairs: impl Iterator<Item = (i64, i64)>) -> MultiplierMetrics {
    let (mut n, mut wrong, mut abs_sum, mut sum, mut sq_sum, mut red_sum, mut red_n, mut worst) =
        (0u64, 0u64, 0f64, 0f64, 0f64, 0f64, 0u64, 0i64);
    for (exact, approx) in pairs {
        let e = approx - exact;
        n += 1;
        wrong += u64::from(e != 0);
        abs_sum += e.abs() as f64;
        sum += e as f64;
        sq_sum += (e as f64) * (e as f64);
        worst = worst.max(e.abs());
        if exact != 0 {
            red_sum += e.abs() as f64 / exact.abs() as f64;
            red_n += 1;
        }
    }
    let n = n as f64;
    let mean = sum / n;
    MultiplierMetrics {
        error_std: (sq_sum / n - mean * mean).max(0.0).sqrt(),
        error_rate: wrong as f64 / n,
        mean_absolute_error: abs_sum / n,
        mred: red_sum / red_n as f64,
        worst_case_error: worst,
        mean_error: mean,
    }
}

/// Error metrics of a multiplier over all signed 8-bit operand pairs (EvoApprox's definitions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiplierMetrics {
    /// Share of pairs whose product is wrong.
    pub error_rate: f64,
    /// Mean `|approx - exact|`.
    pub mean_absolute_error: f64,
    /// Mean relative error distance, `mean(|approx - exact| / |exact|)` over pairs with `exact != 0`.
    pub mred: f64,
    /// Largest `|approx - exact|`.
    pub worst_case_error: i64,
    /// Mean `approx - exact` (the bias).
    pub mean_error: f64,
    /// Standard deviation of `approx - exact` over all pairs (population), TorchApprox's `stdev`.
    pub error_std: f64,
}

impl MultiplierMetrics {
    /// The error of a sum of `fan_in` products as a Gaussian in integer units: mean
    /// `mean_error * fan_in` and standard deviation `error_std * sqrt(fan_in)`, as TorchApprox's
    /// `error_distribution` scales a multiplier's error to a layer (errors taken as independent).
    pub fn layer_error(&self, fan_in: i64) -> (f64, f64) {
        (self.mean_error * fan_in as f64, self.error_std * (fan_in as f64).sqrt())
    }
}

impl FromStr for Multiplier {
    type Err = Error;

    /// `exact`, `truncated:K`, `mitchell`, `drum:K`, or a path to a table file; a suffix
    /// `:wx` gives the [`transposed`](Multiplier::transposed) multiplier (weight × activation),
    /// `:xw` the default order.
    fn from_str(s: &str) -> Result<Self> {
        if let Some(base) = s.strip_suffix(":wx") {
            return Ok(base.parse::<Self>()?.transposed());
        }
        if let Some(base) = s.strip_suffix(":xw") {
            return base.parse();
        }
        let k =
            |v: &str| v.parse::<u32>().map_err(|_| parameter(s.to_string(), &format!("a number, got {v:?}")));
        match s.split_once(':') {
            None if s == "exact" => Ok(Self::exact()),
            None if s == "mitchell" => Ok(Self::mitchell()),
            Some(("truncated", v)) => Self::truncated(k(v)?),
            Some(("drum", v)) => Self::drum(k(v)?),
            Some(("evoapprox", name)) => Self::evoapprox(name),
            None if super::evoapprox::entry(s).is_ok() => Self::evoapprox(s),
            // Anything at the path (a folder or FIFO too) is read as a file, and refused as such.
            _ if std::fs::symlink_metadata(s).is_ok() => Self::load(s),
            _ => Err(Error::UnknownMultiplier { spec: s.to_string() }),
        }
    }
}
