//! What [`Error`] offers beyond its variants: the innermost error of a chain, and libtorch's
//! errors converted.

use super::Error;

impl Error {
    /// The error itself or, for [`Error::In`], the one it wraps: match on this to tell
    /// kinds of failure apart whichever layer they came from.
    pub fn innermost(&self) -> &Error {
        match self {
            Self::In { error, .. } => error.innermost(),
            e => e,
        }
    }
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Self::Torch(e)
    }
}
