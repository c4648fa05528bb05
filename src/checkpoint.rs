//! Saving and loading a `VarStore` safely: atomic writes, and loads that check every name and shape first.

use std::path::Path;

use tch::{nn, Tensor};

use crate::{Error, Result};

/// Saves `vs` to `path` (`.safetensors`) through a temporary file and a rename,
/// so an interrupted run never leaves a damaged checkpoint.
pub fn save_atomic(vs: &nn::VarStore, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !name.ends_with(".safetensors") {
        return Err(Error::Checkpoint(format!(
            "{}: checkpoints are written as .safetensors",
            path.display()
        )));
    }
    let tmp = path.with_file_name(format!(".{name}.{}.tmp.safetensors", std::process::id()));
    let result = vs.save(&tmp).map_err(Error::from).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Loads `path` into `vs` after checking that the file holds exactly the store's
/// variables with the same shapes; otherwise lists what is missing, unexpected or mis-shaped.
pub fn load_checked(vs: &mut nn::VarStore, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    if !path.is_file() {
        return Err(Error::Checkpoint(format!("{}: no such file", path.display())));
    }
    let saved = Tensor::read_safetensors(path).map_err(|e| {
        Error::Checkpoint(format!("{}: not a readable .safetensors file ({e})", path.display()))
    })?;
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
