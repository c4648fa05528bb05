//! The crate's error type.

use tch::{Device, Kind};

/// Everything that can go wrong in this crate, each case naming the offending value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error raised by libtorch itself; shown as its message without C++ stack frames
    /// (see [`torch_message`]), the full text stays in the field.
    #[error("{}", torch_message(.0))]
    Torch(tch::TchError),

    /// A tensor argument that is undefined (`Tensor::new()`).
    #[error("{0} is an undefined tensor (Tensor::new()): pass a tensor with data")]
    Undefined(&'static str),

    /// A bitwidth outside the supported range.
    #[error("bitwidth {0} is out of range: quantizers support 2..=16 bits")]
    Bitwidth(u32),

    /// A tensor of a dtype that cannot be quantized (integers, booleans, complex).
    #[error("cannot quantize a tensor of dtype {0:?}: expected Float, Double, Half or BFloat16")]
    Dtype(Kind),

    /// An input on another device than the quantizer's state.
    #[error("input is on {input:?} but {what} is on {state:?}: move one of them first")]
    Device {
        /// The input's device.
        input: Device,
        /// The device of the quantizer's state.
        state: Device,
        /// Which state, e.g. `PACT alpha`.
        what: &'static str,
    },

    /// An input with NaN or infinite values, reported under [`NonFinite::Reject`](crate::quantizers::NonFinite::Reject).
    #[error("input holds {count} non-finite value(s) (NaN or ±inf) out of {numel}")]
    NonFinite {
        /// How many elements are NaN or infinite.
        count: i64,
        /// The input's number of elements.
        numel: i64,
    },

    /// A numeric argument outside its domain.
    #[error("{what} must be {expected}, got {value}")]
    Argument {
        /// The argument's name.
        what: &'static str,
        /// The value given.
        value: f64,
        /// The domain, in words.
        expected: &'static str,
    },

    /// A thread count outside `0..=max` (0: libtorch's choice).
    #[error("{what} must be 0 (libtorch's default) up to {max} (four per core here), got {value}")]
    Threads {
        /// The argument's name, e.g. `--threads`.
        what: &'static str,
        /// The value given.
        value: i64,
        /// The largest accepted.
        max: i64,
    },

    /// An inference mode name that is not `baseline`, `quant` or `noise`.
    #[error("unknown inference mode {0:?}: expected `baseline`, `quant`, `noise` or `approx`")]
    UnknownMode(String),

    /// Per-channel quantization asked of a quantizer that has none.
    #[error("per-channel weight quantization needs MinMax, not {0}")]
    PerChannel(crate::quantizers::QuantizerKind),

    /// A tensor of the wrong shape.
    #[error("{what}: expected shape {expected}, got {actual:?}")]
    Shape {
        /// Which tensor.
        what: String,
        /// The expected shape, in words.
        expected: String,
        /// The shape given.
        actual: Vec<i64>,
    },

    /// A model name that is not `mlp` or `lenet`.
    #[error("unknown model {0:?}: expected `mlp` or `lenet`")]
    UnknownModel(String),

    /// A data file or folder that is missing or malformed.
    #[error("{0}")]
    Data(String),

    /// A TorchScript model that cannot be loaded, run, imported or saved.
    #[error("{0}")]
    TorchScript(String),

    /// A checkpoint that cannot be written or does not fit the model.
    #[error("{0}")]
    Checkpoint(String),

    /// A multiplier spec or table file that cannot be used.
    #[error("{0}")]
    Multiplier(String),

    /// Weights and buffers that do not fit a network (see [`import`](crate::import)).
    #[error("{0}")]
    Import(String),

    /// A network that cannot be built as described (a repeated or malformed layer name).
    #[error("{0}")]
    Network(String),

    /// An error in one named part of a network, such as a layer of an
    /// [`ApproxSequential`](crate::layers::ApproxSequential).
    #[error("{name}: {error}")]
    In {
        /// The part's name, e.g. `layer1.0.conv2`.
        name: String,
        /// What went wrong there (in the message already, so not a `source()`).
        error: Box<Error>,
    },

    /// A file given as input that cannot be read: missing, a folder or special file, too large.
    #[error("{}: {problem}", crate::files::shown(&path.display().to_string()))]
    InputFile {
        /// The path as given.
        path: std::path::PathBuf,
        /// What is wrong with it.
        problem: crate::files::FileProblem,
    },

    /// A destination that cannot receive a file, or a write that failed (nothing is replaced).
    #[error("cannot write {}: {problem}", crate::files::shown(&path.display().to_string()))]
    Output {
        /// The path as given.
        path: std::path::PathBuf,
        /// Why.
        problem: crate::files::OutputProblem,
    },

    /// A `.safetensors` file whose header or data is malformed (checked before its payload is read).
    #[error("{}: not a readable .safetensors file ({problem})", crate::files::shown(&path.display().to_string()))]
    Safetensors {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, in words.
        problem: String,
    },

    /// A tensor holding NaN or ±inf where only finite values are usable (a loaded or
    /// imported weight, or a variable about to be saved).
    #[error(
        "{origin}: {} holds {count} non-finite value(s) (NaN or ±inf) of {numel}",
        crate::files::shown(name)
    )]
    NonFiniteTensor {
        /// Where the tensor comes from or goes to, e.g. the file.
        origin: String,
        /// The tensor's name.
        name: String,
        /// How many of its values are not finite.
        count: i64,
        /// Its number of values.
        numel: i64,
    },

    /// Loaded quantizer state outside its own domain, such as a PACT `alpha` of 0 or less.
    #[error("{origin}: {} is {value}, but {expected}", crate::files::shown(name))]
    QuantizerState {
        /// Where the state comes from.
        origin: String,
        /// The variable's name, e.g. `conv1.x_quantizer.alpha`.
        name: String,
        /// The offending value.
        value: f64,
        /// What the state must be, in words.
        expected: &'static str,
    },

    /// A quantizer name that is not `minmax`, `pact` or `lsq`.
    #[error("unknown quantizer kind {0:?}: expected `minmax`, `pact` or `lsq`")]
    UnknownKind(String),
}

/// The message a panic carried (`panic!("...")` gives a `&str` or a `String`), if any.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
}

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

/// libtorch's message without the C++ backtrace and frame lines it appends.
///
/// A TorchScript interpreter error keeps the line that says why (`RuntimeError: ...`)
/// rather than its generic first line.
pub fn torch_message(e: &tch::TchError) -> String {
    match e {
        tch::TchError::Torch(msg) => format!("libtorch: {}", strip_backtrace(msg)),
        other => strip_backtrace(&other.to_string()),
    }
}

/// [`torch_message`] for any text, e.g. an error chain that wraps a libtorch error.
pub fn strip_backtrace(text: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut in_frames = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("Exception raised from ") || t.starts_with("frame #") {
            in_frames = true;
            continue;
        }
        if in_frames && (t.is_empty() || line.starts_with(' ') || t.starts_with("frame #")) {
            continue;
        }
        in_frames = false;
        if !t.is_empty() {
            kept.push(t);
        }
    }
    if let Some(at) =
        kept.iter().position(|l| l.contains("The following operation failed in the TorchScript interpreter"))
    {
        // The cause is the last `SomethingError: ...` line of the TorchScript traceback.
        let cause = kept[at..].iter().rev().find(|l| {
            l.split_once(": ").is_some_and(|(head, _)| head.ends_with("Error") && !head.contains(' '))
        });
        let before = kept[..at].join(" ");
        return match cause {
            Some(c) if before.is_empty() => format!("TorchScript: {c}"),
            Some(c) => format!("{before} TorchScript: {c}"),
            None => kept.join(" "),
        };
    }
    kept.join(" ")
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::strip_backtrace;

    #[test]
    fn cpp_frames_are_dropped_and_the_reason_kept() {
        let msg = "shape '[2]' is invalid for input of size 3\nException raised from computeStride at ../aten/src/ATen/TensorUtils.cpp:1 (most recent call first):\nframe #0: c10::Error::Error() + 0x1 (0x7f in libc10.so)\nframe #1: at::native::view() + 0x2\n\nmore context\n";
        assert_eq!(strip_backtrace(msg), "shape '[2]' is invalid for input of size 3 more context");
        let ts = "The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript (most recent call last):\n  File \"code/__torch__.py\", line 8\nRuntimeError: mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)\n";
        assert_eq!(
            strip_backtrace(ts),
            "TorchScript: RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"
        );
        assert_eq!(strip_backtrace("plain"), "plain");
    }
}
