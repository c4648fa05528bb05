//! Calibration: each layer's input statistics recorded in float, turned into its activation
//! range (PACT alpha, MinMax running range, LSQ step size).

use tch::Tensor;

use super::{ApproxLayer, InferenceMode, LayerQuant};
use crate::quantizers::{ApproxQuantizer, Quantizer, ALPHA_MIN};
use crate::{Error, Result};

/// How [`ApproxModule::calibrate`](super::ApproxModule::calibrate) turns each layer's inputs into its range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Calibration {
    /// The largest input magnitude seen.
    Max,
    /// The mean over batches of this percentile (`0 < p <= 100`) of the input magnitudes,
    /// which ignores rare outliers.
    Percentile(f64),
}

impl Calibration {
    /// The range per-batch statistics give: the largest (`Max`) or their mean (`Percentile`),
    /// over the finite ones; `None` where none is positive. Both network kinds (the crate's
    /// and rewritten TorchScript models) reduce their statistics here.
    pub fn range(self, stats: &[f64]) -> Option<f64> {
        let finite: Vec<f64> = stats.iter().copied().filter(|v| v.is_finite()).collect();
        if finite.is_empty() {
            return None;
        }
        let range = match self {
            Calibration::Max => finite.iter().copied().fold(0.0, f64::max),
            Calibration::Percentile(_) => finite.iter().sum::<f64>() / finite.len() as f64,
        };
        (range > 0.0).then_some(range)
    }
}

/// The PACT alpha a calibrated range gives: the range raised to [`ALPHA_MIN`], the smallest
/// clipping level PACT uses, so that the stored alpha is the one in effect.
pub fn pact_alpha(range: f64) -> f64 {
    range.max(ALPHA_MIN)
}

/// [`ApproxModule::calibrate`] over `layers`: the one calibration routine of the crate's networks.
pub(crate) fn calibrate(
    layers: &[(String, &dyn ApproxLayer)],
    batches: &[Tensor],
    forward: &dyn Fn(&Tensor) -> Result<Tensor>,
    method: Calibration,
) -> Result<Vec<(String, f64)>> {
    if let Calibration::Percentile(p) = method {
        if !(p > 0.0 && p <= 100.0) {
            return Err(Error::Argument {
                what: "calibration percentile",
                value: p,
                expected: "in (0, 100]",
            });
        }
    }
    if batches.is_empty() {
        return Err(Error::Argument { what: "calibration batches", value: 0.0, expected: "at least 1" });
    }
    let modes: Vec<InferenceMode> = layers.iter().map(|(_, l)| l.quant().mode()).collect();
    for (_, l) in layers {
        l.quant().set_mode(InferenceMode::Baseline);
        l.quant().set_observing(Some(method));
    }
    let run = tch::no_grad(|| batches.iter().try_for_each(|b| forward(b).map(drop)));
    let mut ranges = Vec::new();
    for ((name, l), mode) in layers.iter().zip(modes) {
        let stats = l.quant().set_observing(None);
        l.quant().set_mode(mode);
        if run.is_ok() && !stats.is_empty() {
            let range = method.range(&stats);
            if let Some(r) = range {
                l.quant().set_input_range(r)?;
            }
            ranges.push((name.clone(), range.unwrap_or(0.0)));
        }
    }
    run?;
    Ok(ranges)
}

impl LayerQuant {
    /// Records the input's statistic while calibrating: `max |x|` or its percentile, over
    /// the finite elements.
    pub(super) fn observe(&self, x: &Tensor) -> Result<()> {
        let mut guard = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        let Some((method, stats)) = guard.as_mut() else { return Ok(()) };
        let _no_grad = tch::no_grad_guard();
        let a = x.f_detach()?.f_abs()?.f_flatten(0, -1)?;
        let a = a.f_masked_select(&a.f_isfinite()?)?;
        if a.numel() == 0 {
            return Ok(());
        }
        let v = match *method {
            Calibration::Max => a.f_max()?.f_double_value(&[])?,
            Calibration::Percentile(p) => {
                let k = ((p / 100.0) * a.numel() as f64).ceil().clamp(1.0, a.numel() as f64) as i64;
                a.f_kthvalue(k, 0, false)?.0.f_double_value(&[])?
            }
        };
        stats.push(v);
        Ok(())
    }

    /// Starts recording input statistics (`Some`) or stops and returns them (`None`).
    pub(super) fn set_observing(&self, method: Option<Calibration>) -> Vec<f64> {
        let mut guard = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        let old = guard.take().map(|(_, v)| v).unwrap_or_default();
        *guard = method.map(|m| (m, Vec::new()));
        old
    }

    /// Sets the activation quantizer's range from a calibrated input magnitude: PACT's
    /// alpha, MinMax's running range, LSQ's step size (`range / int_max`).
    pub fn set_input_range(&self, range: f64) -> Result<()> {
        crate::args::check_positive("calibrated range", range)?;
        let _guard = tch::no_grad_guard();
        match &self.x_quantizer {
            Quantizer::Pact(p) => {
                let _ = p.alpha().shallow_clone().f_fill_(pact_alpha(range))?;
            }
            Quantizer::MinMax(m) => m.set_running_range(range)?,
            Quantizer::Lsq(q) => {
                let _ = q.step_size().shallow_clone().f_fill_(range / self.x_quantizer.int_max() as f64)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{pact_alpha, Calibration};

    #[test]
    fn statistics_reduce_to_one_range() {
        assert_eq!(Calibration::Max.range(&[1.0, 3.0, 2.0]), Some(3.0));
        assert_eq!(Calibration::Percentile(99.0).range(&[1.0, 3.0, 2.0]), Some(2.0));
        assert_eq!(Calibration::Max.range(&[f64::NAN, 2.0, f64::INFINITY]), Some(2.0));
        assert_eq!(Calibration::Max.range(&[0.0, 0.0]), None);
        assert_eq!(Calibration::Max.range(&[]), None);
        assert_eq!(pact_alpha(1.2e-8), crate::quantizers::ALPHA_MIN);
        assert_eq!(pact_alpha(3.0), 3.0);
    }
}
