//! Importing PyTorch weights and buffers (a state dict) into a network's `VarStore` by name.
//!
//! The source is a list of named tensors: a TorchScript model's parameters and buffers
//! ([`ScriptModel::state_dict`](crate::torchscript::ScriptModel::state_dict)) or a
//! safetensors file written by `safetensors.torch.save_file(model.state_dict(), ...)`.
//! BatchNorm's running statistics are buffers, so they come along; its
//! `num_batches_tracked` counter is ignored (tch's BatchNorm has none, and PyTorch only
//! reads it when `momentum=None`).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use tch::{nn, Tensor};

use crate::weights::{SafetensorsFile, WeightSource};
use crate::{Error, Mismatch, Result};

/// How names are matched and what happens to entries that do not fit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// Renames applied to source names before matching, as `(source prefix, network prefix)`
    /// pairs at `.` boundaries: `("features.0", "conv1")` maps `features.0.weight` to
    /// `conv1.weight`; an empty source prefix adds one (`("", "model")`), an empty
    /// network prefix removes one (`("module", "")`). The first pair that matches applies.
    pub rename: Vec<(String, String)>,
    /// Copy what fits and report the rest (missing, unused and mis-shaped entries) in the
    /// [`ImportReport`] instead of failing; for example a new classifier head.
    pub partial: bool,
}

impl ImportOptions {
    /// Options that apply `rename` and fail on anything that does not fit.
    pub fn renamed<S: Into<String>>(rename: impl IntoIterator<Item = (S, S)>) -> Self {
        Self { rename: rename.into_iter().map(|(a, b)| (a.into(), b.into())).collect(), partial: false }
    }

    /// The network name of source entry `name`.
    fn map(&self, name: &str) -> String {
        for (from, to) in &self.rename {
            if name == from {
                return to.clone();
            }
            let rest = if from.is_empty() {
                Some(name)
            } else {
                name.strip_prefix(from.as_str()).and_then(|r| r.strip_prefix('.'))
            };
            if let Some(rest) = rest {
                return crate::layers::join(to, rest);
            }
        }
        name.to_string()
    }
}

/// What an import did, entry by entry (names sorted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Network variables that received the source's value.
    pub copied: Vec<String>,
    /// Network variables left as they were, with why (not in the source, mis-shaped).
    pub kept: Vec<(String, String)>,
    /// Source entries not used, by source name, with why.
    pub unused: Vec<(String, String)>,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "copied {} variable(s)", self.copied.len())?;
        let list =
            |v: &[(String, String)]| v.iter().map(|(n, why)| format!("{n} ({why})")).collect::<Vec<_>>();
        if !self.kept.is_empty() {
            write!(f, "; kept {}: {}", self.kept.len(), list(&self.kept).join(", "))?;
        }
        if !self.unused.is_empty() {
            write!(f, "; unused {}: {}", self.unused.len(), list(&self.unused).join(", "))?;
        }
        Ok(())
    }
}

/// Quantizer state (`x_quantizer.alpha`, `w_quantizer.running_max`, ...): a network
/// variable of this kind keeps its value when the source has none (a float model).
fn is_quantizer_state(name: &str) -> bool {
    name.split('.').any(|part| part.ends_with("_quantizer"))
}

/// Source entries that never map onto a tch variable, with why.
fn ignored(name: &str) -> Option<&'static str> {
    if name.ends_with(".num_batches_tracked") || name == "num_batches_tracked" {
        Some("BatchNorm's batch counter: tch's BatchNorm has none")
    } else if is_quantizer_state(name) && name.ends_with(".observed") {
        Some("calibration buffer of a rewritten TorchScript layer")
    } else {
        None
    }
}

/// Copies `source` into `vs` by name; `origin` names the source in errors (a file path).
///
/// Every source tensor must hold finite values, and quantizer state its domain (see
/// [`check_state`](crate::quantizers::check_state)), in either mode.
///
/// Without [`ImportOptions::partial`], every network variable must be in the source
/// (quantizer state excepted) with the same shape and a float dtype, and every source
/// entry must be used (BatchNorm counters excepted); otherwise nothing is copied and the
/// error lists each problem.
pub fn import_tensors(
    vs: &nn::VarStore,
    source: Vec<(String, Tensor)>,
    origin: &str,
    options: &ImportOptions,
) -> Result<ImportReport> {
    let vars = vs.variables();
    let mut report = ImportReport::default();
    let mut problems = Vec::new();
    let mut mapped: HashMap<String, (String, Tensor)> = HashMap::new();
    for (name, tensor) in source {
        if let Some(why) = ignored(&name) {
            report.unused.push((name, why.to_string()));
            continue;
        }
        // Poisoned values are refused whatever the mode: a partial import must not copy them either.
        crate::quantizers::check_state(origin, &name, &tensor)?;
        let target = options.map(&name);
        if let Some((first, _)) = mapped.get(&target) {
            problems.push(Mismatch::Collision { first: first.clone(), second: name, target });
            continue;
        }
        mapped.insert(target, (name, tensor));
    }
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut copies = Vec::new();
    for name in names {
        let var = &vars[name];
        let Some((src_name, t)) = mapped.get(name) else {
            if !is_quantizer_state(name) && !options.partial {
                problems.push(Mismatch::Missing { name: name.clone() });
            }
            report.kept.push((name.clone(), "not in the source".into()));
            continue;
        };
        let source = src_name.clone();
        let misfit = if !t.defined() {
            Some(Mismatch::Undefined { source })
        } else if t.size() != var.size() {
            Some(Mismatch::Shape { source, got: t.size(), want: var.size() })
        } else if t.is_floating_point() != var.is_floating_point() {
            Some(Mismatch::Dtype { source, got: t.kind(), want: var.kind() })
        } else {
            None
        };
        match misfit {
            Some(m) if options.partial => {
                // The report says why without the entry's name, which it lists beside it.
                let full = m.describe("network");
                let why = full.strip_prefix(src_name.as_str()).unwrap_or(&full).trim_start().to_string();
                report.kept.push((name.clone(), full));
                report.unused.push((src_name.clone(), format!("{why} for {name}")));
            }
            Some(m) => problems.push(m),
            None => copies.push((name.clone(), var, t)),
        }
    }
    let mut unused: Vec<(&String, &String)> =
        mapped.iter().filter(|(target, _)| !vars.contains_key(*target)).map(|(t, (s, _))| (s, t)).collect();
    unused.sort();
    for (src, target) in unused {
        let why =
            if src == target { "no such variable".to_string() } else { format!("no variable {target}") };
        if !options.partial {
            problems.push(Mismatch::Unused { source: src.clone(), why: why.clone() });
        }
        report.unused.push((src.clone(), why));
    }
    if !problems.is_empty() {
        return Err(Error::Import { origin: origin.to_string(), problems });
    }
    tch::no_grad(|| -> Result<()> {
        for (name, var, t) in &copies {
            var.shallow_clone().f_copy_(t)?;
            report.copied.push(name.clone());
        }
        Ok(())
    })?;
    report.kept.sort();
    report.unused.sort();
    Ok(report)
}

/// Reads a safetensors state dict (as `safetensors.torch.save_file(model.state_dict(), path)`
/// writes it) into `vs`; see [`import_tensors`].
///
/// ```no_run
/// use tch::{nn, Device};
/// use torchapprox::import::{import_safetensors, ImportOptions};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// // ... build the network under vs.root() ...
/// let report = import_safetensors(&vs, "resnet.safetensors", &ImportOptions::default())?;
/// println!("{report}");
/// # Ok::<(), torchapprox::Error>(())
/// ```
pub fn import_safetensors(
    vs: &nn::VarStore,
    path: impl AsRef<Path>,
    options: &ImportOptions,
) -> Result<ImportReport> {
    import_from(vs, &SafetensorsFile::new(path), options)
}

/// Copies any [`WeightSource`] into `vs` by name: the one import every source goes through
/// (see [`import_tensors`] for the rules).
pub fn import_from(
    vs: &nn::VarStore,
    source: &dyn WeightSource,
    options: &ImportOptions,
) -> Result<ImportReport> {
    import_tensors(vs, source.tensors()?, &source.origin(), options)
}

#[cfg(test)]
mod tests {
    use super::ImportOptions;

    #[test]
    fn renames_apply_at_dot_boundaries_first_match_wins() {
        let o = ImportOptions::renamed([("features.0", "conv1"), ("features", "body"), ("", "model")]);
        assert_eq!(o.map("features.0.weight"), "conv1.weight");
        assert_eq!(o.map("features.01.weight"), "body.01.weight", "features.0 is no prefix of features.01");
        assert_eq!(o.map("fc.bias"), "model.fc.bias");
        let strip = ImportOptions::renamed([("module", "")]);
        assert_eq!(strip.map("module.fc.weight"), "fc.weight");
        assert_eq!(strip.map("modules.fc.weight"), "modules.fc.weight");
    }
}
