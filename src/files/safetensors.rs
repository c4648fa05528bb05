//! Reading `.safetensors` files: the header is read and checked against the file's size
//! first, so a file's payload is read only when the header honestly accounts for every byte.

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use tch::Tensor;

use super::input::check_input_file;
use crate::{Error, Result};

/// The largest header safetensors accepts (its own limit, 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// The header's entries in file order, duplicates kept (a JSON map would keep only the last).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    v.push(entry);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// What is wrong with a header, judged before any payload is read: duplicate names, and data
/// offsets that end before or after the file does. `data` is the payload's size in bytes.
fn check_header(header: &[u8], data: u64) -> std::result::Result<(), String> {
    let text = std::str::from_utf8(header).map_err(|_| "its header is not UTF-8 text".to_string())?;
    let entries: Entries = serde_json::from_str(text)
        .map_err(|e| format!("its header is not a JSON object of tensors ({e})"))?;
    let mut seen = HashSet::new();
    let mut end = 0u64;
    for (name, info) in &entries.0 {
        if !seen.insert(name.as_str()) {
            return Err(format!("tensor {} appears twice in its header", super::shown(name)));
        }
        if name == "__metadata__" {
            continue;
        }
        // Malformed entries are left to the safetensors parser, which names them.
        if let Some(e) = info.get("data_offsets").and_then(|o| o.get(1)).and_then(|e| e.as_u64()) {
            end = end.max(e);
        }
    }
    if data > end {
        return Err(format!(
            "{} trailing byte(s) after the last tensor (its header accounts for {end} of {data} data bytes)",
            data - end
        ));
    }
    if data < end {
        return Err(format!(
            "it is truncated: its header's tensors need {end} data bytes, the file holds {data}"
        ));
    }
    Ok(())
}

/// The safetensors parser's complaint in words.
fn parser_problem(e: &::safetensors::SafeTensorError) -> String {
    use ::safetensors::SafeTensorError as E;
    match e {
        E::InvalidOffset(name) => {
            format!("tensor {}'s data offsets overlap another tensor or leave a gap", super::shown(name))
        }
        E::TensorInvalidInfo => "a tensor's shape and dtype do not match the size of its data offsets".into(),
        E::ValidationOverflow => "a tensor's shape or offsets overflow".into(),
        E::InvalidHeaderStart => "its header does not start with '{'".into(),
        E::InvalidHeaderDeserialization | E::JsonError(_) => "its header does not describe tensors".into(),
        E::MetadataIncompleteBuffer => "its tensors do not cover its data exactly".into(),
        other => super::one_line(&format!("{other:?}")),
    }
}

/// Every tensor of a `.safetensors` file, in its order. The file must be a regular file whose
/// header (at most 100 MB) accounts for exactly the bytes after it, with no name twice;
/// otherwise [`Error::Safetensors`] names the problem before any payload is read, so memory
/// stays within a small multiple of what the header promises.
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let path = path.as_ref();
    let size = check_input_file(path, None)?;
    let fail = |problem: String| Error::Safetensors { path: path.to_path_buf(), problem };
    if size < 8 {
        return Err(fail(format!("{size} bytes is too short for a header (8 bytes of length, then JSON)")));
    }
    let mut file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| fail(e.to_string()))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Err(fail(format!("its header length {n} is more than safetensors allows ({MAX_HEADER})")));
    }
    if 8 + n > size {
        return Err(fail(format!("its header length {n} runs past the end of the file ({size} bytes)")));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    bytes.extend_from_slice(&len);
    (&mut file).take(n).read_to_end(&mut bytes).map_err(|e| fail(e.to_string()))?;
    check_header(&bytes[8..], size - 8 - n).map_err(fail)?;
    // The header accounts for every byte: reading the rest is what it honestly promised.
    (&mut file).take(size - 8 - n).read_to_end(&mut bytes).map_err(|e| fail(e.to_string()))?;
    if bytes.len() as u64 != size {
        return Err(fail(format!("the file changed while it was read ({} of {size} bytes)", bytes.len())));
    }
    let st = ::safetensors::SafeTensors::deserialize(&bytes).map_err(|e| fail(parser_problem(&e)))?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = Tensor::try_from(view)
                .map_err(|e| fail(format!("tensor {}: {}", super::shown(&name), crate::torch_message(&e))))?;
            Ok((name, t))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::check_header;

    #[test]
    fn headers_are_judged_against_the_data_size() {
        let h = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"k":"v"}}"#;
        assert_eq!(check_header(h, 8), Ok(()));
        assert!(check_header(h, 9).unwrap_err().starts_with("1 trailing byte(s)"));
        assert!(check_header(h, 4).unwrap_err().contains("truncated"));
        let dup = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert_eq!(check_header(dup, 8).unwrap_err(), "tensor a appears twice in its header");
        assert!(check_header(b"\xff", 0).unwrap_err().contains("UTF-8"));
        assert!(check_header(b"[1]", 0).unwrap_err().contains("JSON object"));
    }
}
