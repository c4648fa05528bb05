//! Saving and loading a `VarStore` safely: atomic writes, and loads that check every name and shape first.

use std::path::Path;

use tch::{nn, Tensor};

use crate::quantizers::check_state;
use crate::{Error, Result};

pub use crate::files::check_destination;

/// Saves `vs` to `path` (`.safetensors`) through the crate's atomic writer
/// ([`files::write_atomic`](crate::files::write_atomic)), so an interrupted run never leaves
/// a damaged checkpoint. Refuses, writing nothing, variables holding NaN or ±inf (a diverged
/// run) and quantizer state outside its domain.
pub fn save_atomic(vs: &nn::VarStore, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !name.ends_with(".safetensors") {
        return Err(Error::Checkpoint(format!(
            "{}: checkpoints are written as .safetensors",
            crate::files::shown_path(path)
        )));
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
    let saved = crate::files::read_safetensors(path)?;
    let origin = crate::files::shown_path(path);
    for (name, t) in &saved {
        check_state(&origin, name, t)?;
    }
    let saved: std::collections::HashMap<String, Tensor> = saved.into_iter().collect();
    let mut problems = Vec::new();
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        match saved.get(name) {
            None => problems.push(format!("missing {name}")),
            Some(t) if t.size() != vars[name].size() => problems.push(format!(
                "{name} has shape {:?}, the model needs {:?}",
                t.size(),
                vars[name].size()
            )),
            Some(t) if !t.is_floating_point() => problems.push(format!(
                "{name} has dtype {:?}, the model needs {:?} (integer and bool tensors are not cast)",
                t.kind(),
                vars[name].kind()
            )),
            Some(_) => {}
        }
    }
    let mut extra: Vec<&String> = saved.keys().filter(|k| !vars.contains_key(*k)).collect();
    extra.sort();
    problems.extend(extra.into_iter().map(|k| format!("unexpected {k}")));
    if !problems.is_empty() {
        return Err(Error::Checkpoint(format!(
            "{} does not match the model: {}",
            path.display(),
            problems.join("; ")
        )));
    }
    tch::no_grad(|| -> Result<()> {
        for (name, var) in vars {
            var.shallow_clone().f_copy_(&saved[&name])?;
        }
        Ok(())
    })?;
    Ok(())
}
