//! How the crate's messages are written: libtorch's text without its C++ frames, a panic's
//! payload, and the phrasings several error variants share.

/// The message of [`Error::BadName`]: `layer name "b.c" must be ...`, or the problem alone
/// where it names the name itself.
pub(super) fn name_problem(what: &str, name: &str, problem: &str) -> String {
    if what.is_empty() {
        problem.to_string()
    } else {
        format!("{what} {name:?} {problem}")
    }
}

pub(super) fn mnist_folder(dir: &std::path::Path, missing: Option<&str>) -> String {
    let dir = crate::files::shown_path(dir);
    match missing {
        None => format!("MNIST folder {dir} does not exist or is not a folder"),
        Some(name) => format!("MNIST folder {dir}: missing {name} (or {name}.gz)"),
    }
}

pub(super) fn unknown_layers(
    unknown: &[String],
    model: Option<&std::path::Path>,
    known: &[String],
) -> String {
    match model {
        Some(m) => format!(
            "unknown layer(s) {}: {} has quantizable weights {}",
            unknown.join(", "),
            crate::files::shown_path(m),
            known.join(", ")
        ),
        None => {
            format!("unknown layer {:?}: the model's layers are {}", unknown.join(", "), known.join(", "))
        }
    }
}

pub(super) fn repeated_layer(name: &str, same_as: &str) -> String {
    if name == same_as {
        format!("layer {name} is given twice: give each layer once")
    } else {
        format!("layer override {name:?} repeats {same_as:?}: give each layer once")
    }
}

/// The message a panic carried (`panic!("...")` gives a `&str` or a `String`), if any.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
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
