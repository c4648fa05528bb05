//! [`MnistProblem`]: why an IDX file cannot be read as MNIST.

/// Why an IDX file cannot be read as MNIST; see [`Error::Mnist`](super::Error::Mnist).
#[derive(Debug, Clone, PartialEq)]
pub enum MnistProblem {
    /// Reading failed: `read error` or `corrupt gzip data`, with the system's message.
    Read {
        /// Which failure, in words.
        kind: &'static str,
        /// The system's or decompressor's message.
        error: String,
    },
    /// The header's magic number is not the one of this kind of file.
    Magic {
        /// `image` or `label`.
        what: &'static str,
        /// The expected magic number.
        expected: u32,
        /// What was found (a number, or how few bytes there were).
        found: String,
    },
    /// Header dimensions whose product overflows.
    Overflow {
        /// `image` or `label`.
        what: &'static str,
        /// The header's dimensions.
        dims: Vec<i64>,
    },
    /// A payload longer or shorter than the header promises.
    Payload {
        /// `image` or `label`.
        what: &'static str,
        /// The header's dimensions.
        dims: Vec<i64>,
        /// The bytes they promise.
        expected: u64,
        /// What followed, in words (`more follow`, `12 follow`).
        found: String,
    },
    /// A label that is not a digit.
    Label(u8),
}

impl std::fmt::Display for MnistProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Read { kind, error } => write!(f, "{kind} ({error})"),
            Self::Magic { what, expected, found } => {
                write!(f, "not an IDX {what} file (expected magic {expected:#010x}, found {found})")
            }
            Self::Overflow { what, dims } => {
                write!(f, "header dimensions {dims:?} overflow: no {what} file is that large")
            }
            Self::Payload { what, dims, expected, found } => write!(
                f,
                "header promises {dims:?} = {expected} bytes of {what} but {found} (truncated or corrupt)"
            ),
            Self::Label(l) => write!(f, "label {l} is not a digit 0..=9"),
        }
    }
}
