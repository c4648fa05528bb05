//! The one atomic writer: a private temporary file in the destination's folder, `fsync`, a
//! rename; never over a folder, a device, a FIFO or socket, or one of the writer's own inputs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::input::special_kind;
use crate::{Error, Result};

/// Why a destination cannot receive a file; see [`Error::Output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputProblem {
    /// The path is a folder.
    Folder,
    /// The path ends in `..` or `/`.
    NoFileName,
    /// The path's folder does not exist.
    NoFolder(PathBuf),
    /// The folder refuses new files.
    NotWritable(PathBuf, String),
    /// The path is a FIFO, socket or device (or a symlink to one), named.
    Special(&'static str),
    /// The path is a symlink to nothing.
    DanglingLink,
    /// The path is the same file as this input of the write.
    IsInput(PathBuf),
    /// Writing, syncing or renaming failed.
    Io(String),
}

impl fmt::Display for OutputProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Folder => write!(f, "it is a folder"),
            Self::NoFileName => write!(f, "the path names no file"),
            Self::NoFolder(d) => write!(f, "folder {} does not exist", super::shown_path(d)),
            Self::NotWritable(d, e) => write!(f, "folder {} is not writable ({e})", super::shown_path(d)),
            Self::Special(kind) => {
                write!(f, "it is a {kind}, not a regular file; only regular files are replaced")
            }
            Self::DanglingLink => write!(f, "it is a symlink to nothing"),
            Self::IsInput(i) => {
                write!(f, "it is the input {} (choose another output path)", super::shown_path(i))
            }
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

fn out_err(path: &Path, problem: OutputProblem) -> Error {
    Error::Output { path: path.to_path_buf(), problem }
}

fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Whether `a` and `b` are one file (same device and inode), both existing.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Where a write to `path` lands: `path` itself, or the regular file a symlink points to
/// (so the link survives); an error for anything that is not a regular file or is an input.
fn destination(path: &Path, inputs: &[&Path]) -> Result<PathBuf> {
    if path.file_name().is_none() {
        return Err(out_err(path, OutputProblem::NoFileName));
    }
    let target = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => path.to_path_buf(),
        Err(e) => return Err(out_err(path, OutputProblem::Io(e.to_string()))),
        Ok(meta) => {
            let followed = if meta.file_type().is_symlink() {
                match std::fs::metadata(path) {
                    Ok(m) => m,
                    Err(_) => return Err(out_err(path, OutputProblem::DanglingLink)),
                }
            } else {
                meta
            };
            let t = followed.file_type();
            if t.is_dir() {
                return Err(out_err(path, OutputProblem::Folder));
            }
            if !t.is_file() {
                return Err(out_err(path, OutputProblem::Special(special_kind(t))));
            }
            if let Some(input) = inputs.iter().find(|i| same_file(path, i)) {
                return Err(out_err(path, OutputProblem::IsInput(input.to_path_buf())));
            }
            std::fs::canonicalize(path).map_err(|e| out_err(path, OutputProblem::Io(e.to_string())))?
        }
    };
    let dir = folder_of(&target);
    if !dir.is_dir() {
        return Err(out_err(path, OutputProblem::NoFolder(dir.to_path_buf())));
    }
    Ok(target)
}

/// Checks before any long work that `path` can receive a file: its folder exists and is
/// writable, and `path` is not a folder, a special file (device, FIFO, socket) or a symlink to one.
pub fn check_destination(path: impl AsRef<Path>) -> Result<()> {
    check_output(path, &[])
}

/// [`check_destination`], and that `path` is none of `inputs` (compared as files, so a
/// symlink or another name of an input is refused too).
pub fn check_output(path: impl AsRef<Path>, inputs: &[&Path]) -> Result<()> {
    let path = path.as_ref();
    let target = destination(path, inputs)?;
    let dir = folder_of(&target);
    let probe = temporary(&target);
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(out_err(path, OutputProblem::NotWritable(dir.to_path_buf(), e.to_string()))),
    }
}

/// The marker every temporary file of this writer carries: `.{name}.torchapprox-{pid}-{n}.tmp{.ext}`.
const MARK: &str = ".torchapprox-";

/// A fresh temporary name beside `target`, keeping its extension (tch picks formats by it).
fn temporary(target: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = target.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    folder_of(target).join(format!(".{name}{MARK}{}-{n}.tmp{ext}", std::process::id()))
}

/// Writes `path` atomically: `write` fills a temporary file in the same folder, which is
/// synced and renamed over `path` (or over the regular file a symlink at `path` points to),
/// then the folder is synced. Refuses, before writing, what [`check_output`] refuses.
/// Temporary files of killed writers of the same name are removed first.
pub fn write_atomic(
    path: impl AsRef<Path>,
    inputs: &[&Path],
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    let target = destination(path, inputs)?;
    remove_stale_temporaries(&target);
    let tmp = temporary(&target);
    let io = |e: std::io::Error| out_err(path, OutputProblem::Io(e.to_string()));
    let result = write(&tmp).and_then(|()| {
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
        // Checked again just before the rename: the destination may have changed meanwhile.
        destination(path, inputs)?;
        std::fs::rename(&tmp, &target).map_err(io)?;
        // The rename is durable only once the folder's entry is on disk.
        std::fs::File::open(folder_of(&target)).and_then(|d| d.sync_all()).map_err(io)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic`] of `bytes`.
pub fn write_bytes_atomic(path: impl AsRef<Path>, inputs: &[&Path], bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    write_atomic(path, inputs, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| out_err(path, OutputProblem::Io(e.to_string())))
    })
}

/// The writer's process id in a temporary name of `target`'s, if it is one.
fn temporary_pid(file: &str, name: &str) -> Option<u32> {
    let rest = file.strip_prefix('.')?.strip_prefix(name)?.strip_prefix(MARK)?;
    let (pid, rest) = rest.split_once('-')?;
    let (n, _) = rest.split_once(".tmp")?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Removes temporaries of `target` whose writing process is gone (a killed save's leftovers).
fn remove_stale_temporaries(target: &Path) {
    // Without /proc there is no telling whether a writer is still alive: leave the files.
    if !Path::new("/proc/self").exists() {
        return;
    }
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let Ok(entries) = std::fs::read_dir(folder_of(target)) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = temporary_pid(&file, &name) else { continue };
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if regular && pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_recognised_only_for_their_own_file() {
        let t = temporary(Path::new("/x/ck.safetensors"));
        let file = t.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            file.starts_with(".ck.safetensors.torchapprox-") && file.ends_with(".tmp.safetensors"),
            "{file}"
        );
        assert_eq!(temporary_pid(&file, "ck.safetensors"), Some(std::process::id()));
        assert_eq!(temporary_pid(&file, "ck"), None);
        assert_eq!(temporary_pid(".out.pt.torchapprox-12-0.tmp.pt", "out.pt"), Some(12));
        assert_eq!(temporary_pid(".out.pt.torchapprox-x-0.tmp.pt", "out.pt"), None);
        assert_eq!(temporary_pid("out.pt", "out.pt"), None);
    }
}
