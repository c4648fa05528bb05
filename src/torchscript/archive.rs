//! Checks a TorchScript archive before libtorch reads it: every tensor storage its pickles name must fit its zip record.
//!
//! libtorch allocates a storage from the byte count written in `data.pkl` but fills it from the
//! zip record, trusting the two to agree; a short record then leaves tensors that read (and,
//! once quantized in place, write) past their buffer. The archive's own metadata is enough to
//! rule that out, so nothing of the file reaches libtorch until it passes.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use crate::Result;

/// The largest pickle read (the data pickle of a model with a million tensors is a few tens of MB).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Longer strings are never storage keys or type names and are not kept.
const MAX_NAME_BYTES: usize = 1024;

/// One storage reference of a pickle: `('storage', torch.XStorage, key, location, numel)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageRef {
    pub dtype: String,
    pub key: String,
    pub numel: i64,
}

/// Refuses `path` unless it is a zip archive whose `data.pkl` (and `constants.pkl`, where
/// present) reference only storages whose records hold at least the bytes they promise.
/// `bytes` is the whole file, read once, so what is checked is what libtorch loads.
pub(crate) fn check(path: &Path, bytes: &[u8]) -> Result<()> {
    let fail = |why: String| crate::Error::NotTorchScript { path: path.to_path_buf(), why };
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| fail(format!("not a zip archive: {e}")))?;
    let mut sizes: HashMap<String, u64> = HashMap::with_capacity(zip.len());
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(|e| fail(format!("zip entry {i}: {e}")))?;
        sizes.insert(entry.name().to_string(), entry.size());
    }
    let data_pkl = sizes
        .keys()
        .find(|n| *n == "data.pkl" || n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .cloned()
        .ok_or_else(|| fail("no data.pkl record".into()))?;
    let prefix = &data_pkl[..data_pkl.len() - "data.pkl".len()];
    for archive in ["data", "constants"] {
        let name = format!("{prefix}{archive}.pkl");
        if !sizes.contains_key(&name) {
            continue;
        }
        let mut entry = zip.by_name(&name).map_err(|e| fail(format!("{name}: {e}")))?;
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(fail(format!(
                "{name} is {} bytes, more than the {MAX_PICKLE_BYTES} allowed",
                entry.size()
            )));
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry
            .by_ref()
            .take(MAX_PICKLE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| fail(format!("{name}: {e}")))?;
        drop(entry);
        let refs = storage_refs(&bytes).map_err(|why| fail(format!("{name}: {why}")))?;
        for r in refs {
            let record = format!("{prefix}{archive}/{}", r.key);
            let item = item_size(&r.dtype)
                .ok_or_else(|| fail(format!("{name}: unknown storage type {}", r.dtype)))?;
            let needed = u64::try_from(r.numel)
                .ok()
                .and_then(|n| n.checked_mul(item))
                .ok_or_else(|| fail(format!("tensor record {record} claims {} elements", r.numel)))?;
            if needed == 0 {
                continue;
            }
            match sizes.get(&record) {
                None => return Err(fail(format!("tensor record {record} is missing"))),
                Some(&have) if have < needed => {
                    return Err(fail(format!(
                        "tensor record {record} holds {have} bytes but its {} {} elements need {needed}",
                        r.numel, r.dtype
                    )))
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// Bytes per element of `torch.<dtype>Storage`.
fn item_size(storage: &str) -> Option<u64> {
    Some(match storage.strip_suffix("Storage")? {
        "Bool" | "Byte" | "Char" | "QInt8" | "QUInt8" | "QUInt4x2" | "QUInt2x4" | "Float8_e5m2"
        | "Float8_e4m3fn" | "Float8_e5m2fnuz" | "Float8_e4m3fnuz" | "UInt8" | "Int8" => 1,
        "Short" | "Half" | "BFloat16" | "UInt16" | "Int16" => 2,
        "Int" | "Float" | "QInt32" | "UInt32" | "ComplexHalf" => 4,
        "Long" | "Double" | "ComplexFloat" | "UInt64" => 8,
        "ComplexDouble" => 16,
        _ => return None,
    })
}

/// A pickle value, as far as storage references need it.
#[derive(Debug, Clone)]
enum Value {
    Str(String),
    Int(i64),
    Global(String),
    Tuple(Vec<Value>),
    Mark,
    Other,
}

/// Runs the pickle opcodes TorchScript's pickler writes (protocol 2, plus the later
/// framing and memo opcodes), collecting each persistent id; anything malformed is an error.
pub(crate) fn storage_refs(bytes: &[u8]) -> std::result::Result<Vec<StorageRef>, String> {
    let mut r = Reader { bytes, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let mut refs = Vec::new();
    fn pop(stack: &mut Vec<Value>) -> std::result::Result<Value, String> {
        match stack.pop() {
            Some(Value::Mark) | None => Err("stack underflow".into()),
            Some(v) => Ok(v),
        }
    }
    fn pop_mark(stack: &mut Vec<Value>) -> std::result::Result<Vec<Value>, String> {
        let at = stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or("no mark on the stack")?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    }
    loop {
        let at = r.pos;
        let op = r.u8()?;
        match op {
            0x80 => {
                r.take(1)?;
            }
            0x95 => {
                r.take(8)?;
            }
            b'.' => break,
            b'(' => stack.push(Value::Mark),
            b')' => stack.push(Value::Tuple(Vec::new())),
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err("stack underflow".into());
                }
                let items = stack.split_off(stack.len() - n);
                if items.iter().any(|v| matches!(v, Value::Mark)) {
                    return Err("stack underflow".into());
                }
                stack.push(Value::Tuple(items));
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            b']' | b'}' | b'N' | 0x88 | 0x89 => stack.push(Value::Other),
            b'l' | b'd' => {
                pop_mark(&mut stack)?;
                stack.push(Value::Other);
            }
            b'a' => {
                pop(&mut stack)?;
                pop(&mut stack)?;
                stack.push(Value::Other);
            }
            b's' => {
                pop(&mut stack)?;
                pop(&mut stack)?;
                pop(&mut stack)?;
                stack.push(Value::Other);
            }
            b'e' | b'u' => {
                pop_mark(&mut stack)?;
                pop(&mut stack)?;
                stack.push(Value::Other);
            }
            b'J' => stack.push(Value::Int(i32::from_le_bytes(r.array()?) as i64)),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(u16::from_le_bytes(r.array()?) as i64)),
            0x8a | 0x8b => {
                let n = if op == 0x8a { r.u8()? as usize } else { u32::from_le_bytes(r.array()?) as usize };
                let b = r.take(n)?;
                stack.push(if n <= 8 {
                    let fill = if b.last().is_some_and(|x| x & 0x80 != 0) { 0xff } else { 0 };
                    let mut v = [fill; 8];
                    v[..n].copy_from_slice(b);
                    Value::Int(i64::from_le_bytes(v))
                } else {
                    Value::Other
                });
            }
            b'G' => {
                r.take(8)?;
                stack.push(Value::Other);
            }
            b'X' | b'T' | b'B' | 0x8c | b'U' | b'C' | 0x8d | 0x8e => {
                let n = match op {
                    0x8c | b'U' | b'C' => r.u8()? as usize,
                    0x8d | 0x8e => {
                        usize::try_from(u64::from_le_bytes(r.array()?)).map_err(|_| "string too long")?
                    }
                    _ => u32::from_le_bytes(r.array()?) as usize,
                };
                let b = r.take(n)?;
                stack.push(if matches!(op, b'B' | b'C' | 0x8e) || n > MAX_NAME_BYTES {
                    Value::Other
                } else {
                    Value::Str(String::from_utf8_lossy(b).into_owned())
                });
            }
            b'c' => {
                let (module, name) = (r.line()?, r.line()?);
                stack.push(Value::Global(format!("{module}.{name}")));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                stack.push(match (module, name) {
                    (Value::Str(m), Value::Str(n)) => Value::Global(format!("{m}.{n}")),
                    _ => return Err(format!("STACK_GLOBAL without strings at byte {at}")),
                });
            }
            b'q' | b'r' | 0x94 => {
                let key = match op {
                    b'q' => r.u8()? as u32,
                    b'r' => u32::from_le_bytes(r.array()?),
                    _ => memo.len() as u32,
                };
                // Only what a storage reference is made of: cloning big values on every
                // memo get would let a small hostile pickle take quadratic memory.
                let top = match stack.last().ok_or("memo of an empty stack")? {
                    Value::Tuple(items)
                        if items.len() <= 8 && items.iter().all(|v| !matches!(v, Value::Tuple(_))) =>
                    {
                        Value::Tuple(items.clone())
                    }
                    Value::Tuple(_) => Value::Other,
                    v => v.clone(),
                };
                memo.insert(key, top);
            }
            b'h' | b'j' => {
                let key = if op == b'h' { r.u8()? as u32 } else { u32::from_le_bytes(r.array()?) };
                stack.push(memo.get(&key).cloned().ok_or_else(|| format!("memo key {key} unset"))?);
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                refs.push(storage_ref(pid).map_err(|e| format!("{e} at byte {at}"))?);
                stack.push(Value::Other);
            }
            b'R' | 0x81 => {
                pop(&mut stack)?;
                pop(&mut stack)?;
                stack.push(Value::Other);
            }
            b'b' => {
                pop(&mut stack)?;
            }
            b'0' => {
                stack.pop().ok_or("stack underflow")?;
            }
            b'1' => {
                pop_mark(&mut stack)?;
            }
            b'2' => {
                let top = stack.last().ok_or("stack underflow")?.clone();
                stack.push(top);
            }
            other => return Err(format!("unsupported pickle opcode {other:#04x} at byte {at}")),
        }
    }
    Ok(refs)
}

fn storage_ref(pid: Value) -> std::result::Result<StorageRef, String> {
    let Value::Tuple(items) = pid else { return Err("persistent id is not a tuple".into()) };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(dtype), Value::Str(key), Value::Str(_location), Value::Int(numel)]
            if tag == "storage" =>
        {
            let dtype = dtype.rsplit('.').next().unwrap_or(dtype).to_string();
            if *numel < 0 {
                return Err(format!("storage {key} has {numel} elements"));
            }
            Ok(StorageRef { dtype, key: key.clone(), numel: *numel })
        }
        _ => Err("persistent id is not ('storage', type, key, location, numel)".into()),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or("truncated pickle")?;
        let b = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn line(&mut self) -> std::result::Result<String, String> {
        let rest = &self.bytes[self.pos..];
        let n = rest.iter().take(MAX_NAME_BYTES).position(|&b| b == b'\n').ok_or("malformed GLOBAL")?;
        self.pos += n + 1;
        Ok(String::from_utf8_lossy(&rest[..n]).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::{item_size, storage_refs, StorageRef};

    /// `BINUNICODE s`.
    fn text(s: &str) -> Vec<u8> {
        let mut b = vec![b'X'];
        b.extend_from_slice(&(s.len() as u32).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
        b
    }

    /// A pickle holding one persistent id `('storage', torch.<dtype>, key, 'cpu', numel)`.
    fn persistent_id(dtype: &str, key: &str, numel: u8) -> Vec<u8> {
        let mut b = b"\x80\x02(".to_vec();
        b.extend(text("storage"));
        b.extend_from_slice(format!("ctorch\n{dtype}\n").as_bytes());
        b.extend(text(key));
        b.extend(text("cpu"));
        b.extend_from_slice(&[b'K', numel, b't', b'Q', b'.']);
        b
    }

    #[test]
    fn storage_references_are_read_from_the_pickle() {
        let refs = storage_refs(&persistent_id("FloatStorage", "7", 6)).unwrap();
        assert_eq!(refs, [StorageRef { dtype: "FloatStorage".into(), key: "7".into(), numel: 6 }]);
        assert_eq!(item_size("FloatStorage"), Some(4));
        assert_eq!(item_size("ComplexDouble"), None, "not a storage name");
        assert_eq!(item_size("BFloat16Storage"), Some(2));
    }

    #[test]
    fn malformed_pickles_are_errors_not_panics() {
        let good = persistent_id("LongStorage", "0", 3);
        for cut in 0..good.len() - 1 {
            assert!(storage_refs(&good[..cut]).is_err(), "a pickle cut at {cut} was accepted");
        }
        assert!(storage_refs(b"\x80\x02Q.").is_err(), "a persistent id from an empty stack");
    }
}
