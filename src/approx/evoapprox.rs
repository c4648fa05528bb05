//! EvoApproxLib's 8x8 multipliers, built in: their tables (in TorchApprox's layout) and the
//! figures EvoApproxLib publishes for each (`examples/data/evoapprox`, MIT licence, cited there).

use std::io::Read;
use std::sync::OnceLock;

use super::multiplier::TABLE_SIZE;
use crate::{Error, Result};

const TABLES: &[u8] = include_bytes!("../../examples/data/evoapprox/tables.bin.gz");
const UNSIGNED_RAW: &[u8] = include_bytes!("../../examples/data/evoapprox/unsigned_raw.bin.gz");
const CATALOGUE: &str = include_str!("../../examples/data/evoapprox/catalogue.csv");

/// One EvoApproxLib multiplier and its published figures (45 nm PDK synthesis; errors in %
/// of the output range 2^16, relative errors in %).
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogueEntry {
    /// The circuit's name, e.g. `mul8s_1KV8`.
    pub name: String,
    /// Signed operands (`mul8s_*`); unsigned ones (`mul8u_*`) are used sign-magnitude, as
    /// TorchApprox uses them.
    pub signed: bool,
    /// Power, mW.
    pub power: f64,
    /// Area, µm².
    pub area: f64,
    /// Delay, ns.
    pub delay: f64,
    /// Mean absolute error, % of 2^16.
    pub mae_percent: f64,
    /// Worst-case absolute error, % of 2^16.
    pub wce_percent: f64,
    /// Mean relative error over pairs with a non-zero exact product, %.
    pub mre_percent: f64,
    /// Error probability: share of the 65,536 operand pairs with a wrong product, %.
    pub ep_percent: f64,
    /// Position of the table in the embedded data.
    index: usize,
    /// Position among the unsigned multipliers (their raw tables), if unsigned.
    unsigned_index: Option<usize>,
}

fn parse_catalogue() -> Vec<CatalogueEntry> {
    let mut out = Vec::new();
    let mut unsigned = 0;
    for (i, line) in CATALOGUE.lines().skip(1).filter(|l| !l.is_empty()).enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        let num = |k: usize| f.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
        let signed = f[1] == "true";
        out.push(CatalogueEntry {
            name: f[0].to_string(),
            signed,
            power: num(2),
            area: num(3),
            delay: num(4),
            mae_percent: num(5),
            wce_percent: num(6),
            mre_percent: num(7),
            ep_percent: num(8),
            index: i,
            unsigned_index: (!signed).then(|| {
                unsigned += 1;
                unsigned - 1
            }),
        });
    }
    out
}

/// Every built-in EvoApprox multiplier with its published figures, signed ones first.
pub fn catalogue() -> &'static [CatalogueEntry] {
    static C: OnceLock<Vec<CatalogueEntry>> = OnceLock::new();
    C.get_or_init(parse_catalogue)
}

/// The catalogue entry of `name`, or [`Error::UnknownMultiplier`].
pub fn entry(name: &str) -> Result<&'static CatalogueEntry> {
    catalogue()
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| Error::UnknownMultiplier { spec: name.to_string() })
}

/// Table `index` of a gzip stream of 65,536-int32 tables, decompressing only up to it.
fn nth_table(gz: &[u8], index: usize) -> Vec<i32> {
    let mut r = flate2::read::GzDecoder::new(gz);
    let bytes = TABLE_SIZE * 4;
    std::io::copy(&mut (&mut r).take((index * bytes) as u64), &mut std::io::sink()).expect("embedded data");
    let mut buf = vec![0u8; bytes];
    r.read_exact(&mut buf).expect("embedded data holds every catalogued table");
    buf.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// The table of `entry` in TorchApprox's layout, `table[a as u8 * 256 + b as u8]`.
pub(crate) fn table(entry: &CatalogueEntry) -> Vec<i32> {
    nth_table(TABLES, entry.index)
}

/// The multiplier's products over its own operand range, row = first operand: signed bytes
/// (`a as u8`) for `mul8s_*`, `0..=255` for `mul8u_*`. EvoApprox's figures are defined on these.
pub fn raw_products(name: &str) -> Result<Vec<i32>> {
    let e = entry(name)?;
    Ok(match e.unsigned_index {
        Some(u) => nth_table(UNSIGNED_RAW, u),
        None => table(e),
    })
}

/// EvoApprox's error figures of a multiplier's raw products (see [`raw_products`]), in %:
/// `(mae, wce, mre, ep)` with the output range 2^16 as the normaliser, the mean relative error
/// over pairs with a non-zero exact product.
pub fn error_figures(raw: &[i32], signed: bool) -> (f64, f64, f64, f64) {
    let operand = |i: i64| if signed { i as u8 as i8 as i64 } else { i };
    let pairs = (0..256i64).flat_map(|r| (0..256i64).map(move |c| (r, c)));
    let m = super::multiplier::error_metrics(
        pairs.map(|(r, c)| (operand(r) * operand(c), raw[(r * 256 + c) as usize] as i64)),
    );
    let range = 65536.0; // the output range 2^16 of an 8x8 multiplier
    (
        100.0 * m.mean_absolute_error / range,
        100.0 * m.worst_case_error as f64 / range,
        100.0 * m.mred,
        100.0 * m.error_rate,
    )
}
