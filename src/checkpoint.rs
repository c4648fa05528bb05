//! Saving and loading a `VarStore` safely: atomic writes, and loads that check every name and shape first.

use std::path::Path;

use tch::{nn, Tensor};

use crate::quantizers::check_state;
use crate::weights::WeightSource;
use crate::{Error, Mismatch, Result};

pub use crate::files::check_destination;

/// Saves `vs` to `path` (`.safetensors`) through the crate's atomic writer
/// ([`files::write_atomic`](crate::files::write_atomic)), so an interrupted run never leaves
/// a damaged checkpoint. Refuses, writing nothing, variables holding NaN or ±inf (a diverged
/// run) and quantizer state outside its domain.
pub fn save_atomic(vs: &nn::VarStore, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !name.ends_with(".safetensors") {
        return Err(Error::CheckpointName { path: path.to_path_buf() });
    }
    check_variables(vs, &format!("refusing to write {}", crate::files::shown_path(path)))?;
    // tch picks the format from the extension, which the temporary name keeps.
    crate::files::write_atomic(path, &[], |tmp| Ok(vs.save(tmp)?))
}

/// Checks every variable of `vs` with [`check_state`] (finite values, quantizer state in its
/// domain), in name order; `origin` starts the error, e.g. `training diverged in epoch 3`.
pub fn check_variables(vs: &nn::VarStore, origin: &str) -> Result<()> {
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        check_state(origin, name, &vars[name])?;
    }
    Ok(())
}

/// Loads `path` into `vs` after checking that the file holds exactly the store's
/// variables with the same shapes; otherwise lists what is missing, unexpected or mis-shaped.
pub fn load_checked(vs: &mut nn::VarStore, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let source = crate::weights::SafetensorsFile::new(path);
    let saved = source.tensors()?;
    let origin = source.origin();
    for (name, t) in &saved {
        check_state(&origin, name, t)?;
    }
    let saved: std::collections::HashMap<String, Tensor> = saved.into_iter().collect();
    let mut problems = Vec::new();
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let (source, want) = (name.clone(), &vars[name]);
        match saved.get(name) {
            None => problems.push(Mismatch::Missing { name: source }),
            Some(t) if t.size() != want.size() => {
                problems.push(Mismatch::Shape { source, got: t.size(), want: want.size() })
            }
            Some(t) if !t.is_floating_point() => {
                problems.push(Mismatch::Dtype { source, got: t.kind(), want: want.kind() })
            }
            Some(_) => {}
        }
    }
    let mut extra: Vec<&String> = saved.keys().filter(|k| !vars.contains_key(*k)).collect();
    extra.sort();
    problems.extend(extra.into_iter().map(|k| Mismatch::Unexpected { name: k.clone() }));
    if !problems.is_empty() {
        return Err(Error::CheckpointMismatch { path: path.to_path_buf(), problems });
    }
    tch::no_grad(|| -> Result<()> {
        for (name, var) in vars {
            var.shallow_clone().f_copy_(&saved[&name])?;
        }
        Ok(())
    })?;
    Ok(())
}
