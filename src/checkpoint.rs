//! Saving and loading a `VarStore` safely: atomic writes, and loads that check every name and shape first.

use std::path::Path;

use tch::{nn, Tensor};

use crate::{Error, Result};

/// Saves `vs` to `path` (`.safetensors`) through a temporary file, `fsync` and a rename,
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
    // tch picks the format from the extension, so the temporary name keeps it.
    write_atomic(path, ".safetensors", Error::Checkpoint, |tmp| Ok(vs.save(tmp)?))
}

/// Checks before any long work that `path` can receive a file: its folder exists and is
/// writable, and `path` is not a folder itself.
pub fn check_destination(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let bad = |why: &str| Error::Checkpoint(format!("cannot write {}: {why}", path.display()));
    if path.is_dir() {
        return Err(bad("it is a folder"));
    }
    if path.file_name().is_none() {
        return Err(bad("the path names no file"));
    }
    let dir = folder_of(path);
    if !dir.is_dir() {
        return Err(bad(&format!("folder {} does not exist", dir.display())));
    }
    let probe = dir.join(format!(".torchapprox-probe.{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(bad(&format!("folder {} is not writable ({e})", dir.display()))),
    }
}

fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `path` through `.{name}.{pid}.tmp{suffix}` in the same folder: `write` fills the
/// temporary file, which is synced, renamed over `path`, and the folder synced. Temporary
/// files of this pattern left by processes that no longer run are removed first.
pub(crate) fn write_atomic(
    path: &Path,
    suffix: &str,
    error: fn(String) -> Error,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = folder_of(path);
    remove_stale_temporaries(dir, &name, suffix);
    let tmp = dir.join(format!(".{name}.{}.tmp{suffix}", std::process::id()));
    let io = |e: std::io::Error| error(format!("{}: {e}", path.display()));
    let result = write(&tmp).and_then(|()| {
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        // The rename is durable only once the folder's entry is on disk.
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes `.{name}.{pid}.tmp{suffix}` files whose process is gone (a killed save's leftovers).
fn remove_stale_temporaries(dir: &Path, name: &str, suffix: &str) {
    // Without /proc there is no telling whether a writer is still alive: leave the files.
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let head = format!(".{name}.");
    let tail = format!(".tmp{suffix}");
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file.strip_prefix(&head).and_then(|r| r.strip_suffix(&tail)) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
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
