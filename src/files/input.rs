//! Files given as input: present, a regular file (through symlinks), and no larger than the format allows.

use std::fmt;
use std::path::Path;

use crate::{Error, Result};

/// Why a file given as input cannot be read; see [`Error::InputFile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileProblem {
    /// Nothing exists at the path.
    Missing,
    /// The path is a folder.
    Folder,
    /// The path is a FIFO, socket or device (named), not a regular file.
    Special(&'static str),
    /// The file is larger than its format allows.
    TooLarge {
        /// The file's size in bytes.
        size: u64,
        /// The most the format allows.
        max: u64,
        /// What the format is, e.g. `a multiplier table`.
        what: &'static str,
    },
    /// The system refused to read it (permissions, I/O).
    Io(String),
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => write!(f, "no such file"),
            Self::Folder => write!(f, "is a folder, not a file"),
            Self::Special(kind) => write!(f, "is a {kind}, not a regular file"),
            Self::TooLarge { size, max, what } => {
                write!(f, "{size} bytes is more than {what} can hold ({max} bytes at most)")
            }
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

/// The kind of a file that is neither regular nor a folder, in words.
pub(crate) fn special_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

/// Checks that `path` names a regular file (symlinks followed) of at most `max` bytes and
/// returns its size; otherwise [`Error::InputFile`] says why, without opening it (a FIFO
/// would block the reader).
pub fn check_input_file(path: impl AsRef<Path>, max: Option<(u64, &'static str)>) -> Result<u64> {
    let path = path.as_ref();
    let fail = |problem| Error::InputFile { path: path.to_path_buf(), problem };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(fail(FileProblem::Missing)),
        Err(e) => return Err(fail(FileProblem::Io(e.to_string()))),
    };
    let t = meta.file_type();
    if t.is_dir() {
        return Err(fail(FileProblem::Folder));
    }
    if !t.is_file() {
        return Err(fail(FileProblem::Special(special_kind(t))));
    }
    match max {
        Some((max, what)) if meta.len() > max => {
            Err(fail(FileProblem::TooLarge { size: meta.len(), max, what }))
        }
        _ => Ok(meta.len()),
    }
}
