//! Files in and out: the one atomic writer, checks on files given as input, and a safetensors
//! reader that checks the header against the file's size before reading any payload.

mod atomic;
mod input;
mod safetensors;

pub use atomic::{check_destination, check_output, write_atomic, write_bytes_atomic, OutputProblem};
pub use input::{check_input_file, FileProblem};
pub use safetensors::read_safetensors;

/// `s` with control and bidirectional-override characters escaped (`\u{202e}`), so that a
/// name echoed in a message cannot reorder or split the line it is printed on.
pub fn shown(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// A parser's message, possibly several lines quoting the input, as one [`shown`] line of at
/// most 300 characters.
pub fn one_line(s: &str) -> String {
    let joined: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let line = shown(&joined.join(" "));
    match line.char_indices().nth(300) {
        Some((at, _)) => format!("{}...", &line[..at]),
        None => line,
    }
}

/// A path as [`shown`] prints it.
pub(crate) fn shown_path(p: &std::path::Path) -> String {
    shown(&p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn control_and_bidi_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(shown("fc1.weight"), "fc1.weight");
        assert_eq!(shown("a\u{202e}gnp.exe"), "a\\u{202e}gnp.exe");
        assert_eq!(shown("two\nlines\t"), "two\\u{a}lines\\u{9}");
        assert_eq!(shown("über ünïcode"), "über ünïcode");
        assert_eq!(shown("\u{2066}x\u{2069}"), "\\u{2066}x\\u{2069}");
    }

    #[test]
    fn parser_messages_become_one_bounded_line() {
        assert_eq!(super::one_line("syntax error:\n  --> 1:88\n  |\n"), "syntax error: --> 1:88 |");
        let long = "x".repeat(400);
        assert_eq!(super::one_line(&long).len(), 303);
    }
}
