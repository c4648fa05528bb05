//! Calibration of a rewritten model's PACT alphas from data, and reading them back.

use tch::Tensor;

use tch::CModule;

use super::rewrite::observing_quantizers;
use super::{RewrittenLayer, ScriptModel};
use crate::glue::jit;
use crate::layers::{pact_alpha, Calibration};
use crate::quantizers::QuantizerKind;
use crate::{Error, Result};

/// A rewritten layer's PACT alphas: `(layer, input alpha, weight alpha)`, `None` for MinMax.
pub type LayerAlphas = (String, Option<f64>, Option<f64>);

/// One input quantizer that observes for calibration: its label in the result (the layer,
/// or `<attention>.out_proj`), its module path, and whether it is PACT's (else running MinMax).
struct Observer {
    label: String,
    path: String,
    pact: bool,
}

/// The observing input quantizers of `layers`.
fn observers(layers: &[RewrittenLayer]) -> Vec<Observer> {
    layers
        .iter()
        .flat_map(|l| {
            observing_quantizers(l).into_iter().map(move |q| Observer {
                label: match q.strip_suffix(".x_quantizer") {
                    Some(owner) => crate::layers::join(&l.name, owner),
                    None => l.name.clone(),
                },
                path: crate::layers::join(&l.name, q),
                pact: l.spec.x_kind == QuantizerKind::Pact,
            })
        })
        .collect()
}

/// Sets `calibrating` on each observing input quantizer.
fn set_calibrating(m: &CModule, observers: &[Observer], on: bool) -> Result<()> {
    for o in observers {
        jit::set_bool(m, &o.path, "calibrating", on)?;
    }
    Ok(())
}

impl ScriptModel {
    /// Sets every PACT input alpha (and running MinMax input range) of the rewritten layers
    /// from data: runs the model in float on the first `batches` batches of `images` (no
    /// gradient), takes each layer's largest input magnitude, and makes it that layer's alpha
    /// (at least the floor the forward applies, so the stored value is the one in effect) or
    /// running range. Returns the values by layer.
    pub fn calibrate(
        &mut self,
        images: &Tensor,
        batches: usize,
        batch_size: i64,
    ) -> Result<Vec<(String, f64)>> {
        let watched = observers(&self.rewritten);
        if watched.is_empty() {
            return Err(Error::NothingToDo {
                model: self.source.clone(),
                what: "no PACT or running MinMax input quantizers to calibrate: call quantize_layers first",
            });
        }
        if batch_size < 1 || batches == 0 {
            return Err(Error::Argument {
                what: "calibration batches",
                value: batches as f64,
                expected: "at least 1, of at least 1 sample",
            });
        }
        let n = images.size().first().copied().unwrap_or(0);
        if n == 0 {
            return Err(Error::NoData { what: "calibration needs images, got none" });
        }
        let _guard = tch::no_grad_guard();
        // The forward assigns a new tensor to `observed`: it is looked up afresh each time.
        let observed = |o: &Observer| jit::get_tensor(&self.module, &o.path, "observed");
        // Each batch's maximum, one statistic per batch as the crate's layers record them.
        let mut stats = vec![Vec::new(); watched.len()];
        set_calibrating(&self.module, &watched, true)?;
        let run = (|| -> Result<()> {
            for b in 0..batches as i64 {
                let start = b * batch_size;
                if start >= n {
                    break;
                }
                for o in &watched {
                    let _ = observed(o)?.f_zero_()?;
                }
                let x = images.f_narrow(0, start, batch_size.min(n - start))?.f_to_device(self.device)?;
                let _ = self.forward(&x)?;
                for (s, o) in stats.iter_mut().zip(&watched) {
                    s.push(observed(o)?.f_double_value(&[])?);
                }
            }
            Ok(())
        })();
        set_calibrating(&self.module, &watched, false)?;
        run?;
        let mut alphas = Vec::new();
        for (o, s) in watched.iter().zip(&stats) {
            let mut value =
                jit::get_tensor(&self.module, &o.path, if o.pact { "alpha" } else { "running_max" })?;
            // The same reduction and alpha floor as the crate's networks.
            if let Some(range) = Calibration::Max.range(s) {
                let _ = value.f_fill_(if o.pact { pact_alpha(range) } else { range })?;
            }
            alphas.push((o.label.clone(), value.f_double_value(&[0])?));
        }
        Ok(alphas)
    }

    /// The current PACT alphas of the rewritten layers: `(layer, x alpha, w alpha)`; for an
    /// attention, those of its input projection (`x_quantizer`, `w_quantizer`; the others,
    /// `k_w_quantizer`, `v_w_quantizer` and `out_proj`'s, are among the model's parameters).
    pub fn alphas(&self) -> Result<Vec<LayerAlphas>> {
        let read = |l: &RewrittenLayer, q: &str, kind: QuantizerKind| -> Result<Option<f64>> {
            if kind != QuantizerKind::Pact {
                return Ok(None);
            }
            Ok(Some(
                jit::get_tensor(&self.module, &crate::layers::join(&l.name, q), "alpha")?
                    .f_double_value(&[0])?,
            ))
        };
        self.rewritten
            .iter()
            .map(|l| {
                Ok((
                    l.name.clone(),
                    read(l, "x_quantizer", l.spec.x_kind)?,
                    read(l, "w_quantizer", l.spec.w_kind)?,
                ))
            })
            .collect()
    }
}
