//! Post-training weight quantization of a TorchScript model, in place, with a report per weight.

use std::path::Path;

use tch::{Kind, Tensor};

use super::ScriptModel;
use crate::quantizers::{check_bitwidth, ApproxQuantizer, MinMaxQuant, QuantConfig};
use crate::Result;

/// A weight that post-training quantization replaces: a float parameter with two or more dimensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizableWeight {
    /// The parameter's name, e.g. `conv1.weight`.
    pub name: String,
    /// Its shape.
    pub shape: Vec<i64>,
}

/// Settings of post-training weight quantization (MinMax).
#[derive(Debug, Clone, PartialEq)]
pub struct PtqConfig {
    /// Bits of every weight, `2..=16`; default 8.
    pub bits: u32,
    /// One scale per output channel instead of one per tensor.
    pub per_channel: bool,
    /// Per-layer bitwidths by parameter name (`fc1.weight`) or module name (`fc1`).
    pub overrides: Vec<(String, u32)>,
}

impl Default for PtqConfig {
    /// 8 bits per tensor, no overrides.
    fn default() -> Self {
        Self { bits: 8, per_channel: false, overrides: Vec::new() }
    }
}

impl PtqConfig {
    pub(super) fn bits_for(&self, name: &str) -> u32 {
        let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
        self.overrides.iter().rev().find(|(n, _)| n == name || n == module).map_or(self.bits, |(_, b)| *b)
    }
}

/// What quantization did to one weight.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerReport {
    /// The parameter's name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// The bitwidth used.
    pub bits: u32,
    /// Whether scales are per output channel.
    pub per_channel: bool,
    /// The scale factor(s): one, or one per output channel.
    pub scales: Vec<f64>,
    /// `max |w - q(w)|`.
    pub max_abs_error: f64,
    /// Signal-to-quantization-noise ratio, `10 log10(sum w^2 / sum (w - q(w))^2)`, in dB (infinite for an exact grid).
    /// A few outliers dominate both sums: read it with [`zeroed`](Self::zeroed).
    pub sqnr_db: f64,
    /// Share of the non-zero weights that quantize to 0, in `[0, 1]`: near 1, one outlier set
    /// the range and the layer is lost whatever the SQNR says (see [`collapsed`](Self::collapsed)).
    pub zeroed: f64,
}

impl LayerReport {
    /// Whether quantization lost the layer: more than half of its non-zero weights became 0.
    pub fn collapsed(&self) -> bool {
        self.zeroed > 0.5
    }
}

/// Share of the non-zero values of `w` that are 0 in `q`.
fn zeroed_share(w: &Tensor, q: &Tensor) -> Result<f64> {
    let nonzero = w.f_ne(0.0)?;
    let n = nonzero.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    if n == 0 {
        return Ok(0.0);
    }
    let lost = nonzero.f_logical_and(&q.f_eq(0.0)?)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    Ok(lost as f64 / n as f64)
}

/// `max |w - q|` and the SQNR in dB, in float64 and relative to `max |w|`, so that neither
/// squares nor sums overflow; infinite SQNR only for an exact grid.
fn error_stats(w: &Tensor, q: &Tensor) -> Result<(f64, f64)> {
    let w = w.f_to_kind(Kind::Double)?;
    let err = q.f_to_kind(Kind::Double)?.f_sub(&w)?;
    let max_abs_error = err.f_abs()?.f_max()?.f_double_value(&[])?;
    let peak = w.f_abs()?.f_max()?.f_double_value(&[])?;
    if max_abs_error == 0.0 {
        return Ok((0.0, f64::INFINITY));
    }
    let signal = w.f_div_scalar(peak)?.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
    let noise = err.f_div_scalar(peak)?.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
    let sqnr_db = if noise > 0.0 {
        10.0 * (signal / noise).log10()
    } else {
        10.0 * (signal / f64::MIN_POSITIVE).log10()
    };
    Ok((max_abs_error, sqnr_db))
}

/// Refuses weights holding NaN or ±inf: their quantization would be meaningless.
fn check_finite_weights(source: &Path, weights: &[(String, Tensor)]) -> Result<()> {
    for (name, w) in weights {
        let bad = w.f_isfinite()?.f_logical_not()?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        if bad > 0 {
            return Err(crate::Error::NonFiniteTensor {
                origin: crate::files::shown_path(source),
                name: format!("weight {name}"),
                count: bad,
                numel: w.numel() as i64,
            });
        }
    }
    Ok(())
}

impl ScriptModel {
    /// Linear and Conv weights: float parameters with two or more dimensions, in module order.
    pub(super) fn quantizable(&self) -> Result<Vec<(String, Tensor)>> {
        let params = self.parameters()?;
        Ok(params.into_iter().filter(|(_, t)| t.dim() >= 2 && t.is_floating_point()).collect())
    }

    /// The weights post-training quantization replaces (Linear and Conv weights), in module order.
    pub fn quantizable_weights(&self) -> Result<Vec<QuantizableWeight>> {
        Ok(self
            .quantizable()?
            .into_iter()
            .map(|(name, t)| QuantizableWeight { name, shape: t.size() })
            .collect())
    }

    /// Replaces every quantizable weight by its MinMax fake-quantized value, in place;
    /// biases, BatchNorm parameters and buffers stay untouched.
    pub fn quantize_weights(&self, config: &PtqConfig) -> Result<Vec<LayerReport>> {
        let weights = self.quantizable()?;
        if weights.is_empty() {
            return Err(crate::Error::NothingToDo {
                model: self.source.clone(),
                what: "no quantizable weights (float parameters with two or more dimensions)",
            });
        }
        self.check_overrides(config, &weights)?;
        let _guard = tch::no_grad_guard();
        let mut reports = Vec::with_capacity(weights.len());
        for (name, w) in weights {
            let bits = check_bitwidth(config.bits_for(&name))?;
            let q = MinMaxQuant::stateless(QuantConfig {
                per_channel: config.per_channel,
                ..QuantConfig::with_bitwidth(bits)
            })?;
            let fq = q.f_fake_quantize(&w)?;
            let (max_abs_error, sqnr_db) = error_stats(&w, &fq)?;
            let zeroed = zeroed_share(&w, &fq)?;
            w.shallow_clone().f_copy_(&fq)?;
            reports.push(LayerReport {
                name,
                shape: w.size(),
                bits,
                per_channel: config.per_channel && w.dim() >= 2,
                scales: q.scale_factors(),
                max_abs_error,
                sqnr_db,
                zeroed,
            });
        }
        Ok(reports)
    }

    pub(super) fn check_overrides(&self, config: &PtqConfig, weights: &[(String, Tensor)]) -> Result<()> {
        check_finite_weights(&self.source, weights)?;
        // `fc1` and `fc1.weight` name the same weight: two overrides of one layer are ambiguous.
        let target = |n: &str| {
            weights.iter().position(|(w, _)| w == n || w.rsplit_once('.').is_some_and(|(m, _)| m == n))
        };
        for (i, (a, _)) in config.overrides.iter().enumerate() {
            if let Some(other) =
                config.overrides[..i].iter().find(|(b, _)| target(b).is_some() && target(b) == target(a))
            {
                return Err(crate::Error::RepeatedLayer { name: a.clone(), same_as: other.0.clone() });
            }
        }
        let known =
            |n: &str| weights.iter().any(|(w, _)| w == n || w.rsplit_once('.').is_some_and(|(m, _)| m == n));
        let unknown: Vec<&str> =
            config.overrides.iter().map(|(n, _)| n.as_str()).filter(|n| !known(n)).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(crate::Error::UnknownLayers {
            unknown: unknown.into_iter().map(String::from).collect(),
            model: Some(self.source.clone()),
            known: weights.iter().map(|(n, _)| n.clone()).collect(),
        })
    }
}
