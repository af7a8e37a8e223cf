//! A small msgpack codec for [`Value`], byte-compatible with msgpack-python's `packb`
//! (smallest integer encodings, float64, str8 allowed, bin for bytes).

use crate::Value;

/// Nesting deeper than this is rejected (protects the stack against crafted input).
pub const MAX_DEPTH: usize = 512;

pub fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    write(&mut out, value);
    out
}

fn write_len(
    out: &mut Vec<u8>,
    len: usize,
    fix: Option<(u8, usize)>,
    m8: Option<u8>,
    m16: u8,
    m32: u8,
) {
    if let Some((base, max)) = fix {
        if len <= max {
            out.push(base | len as u8);
            return;
        }
    }
    if let Some(m) = m8 {
        if len <= u8::MAX as usize {
            out.extend_from_slice(&[m, len as u8]);
            return;
        }
    }
    if len <= u16::MAX as usize {
        out.push(m16);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        // Lengths above u32::MAX cannot be represented; callers never produce them for the
        // small dict parts this codec is used for, and the message size limit rejects them.
        out.push(m32);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

fn write_int(out: &mut Vec<u8>, i: i64) {
    if i >= 0 {
        write_uint(out, i as u64);
    } else if i >= -32 {
        out.push(i as i8 as u8);
    } else if i >= i8::MIN as i64 {
        out.extend_from_slice(&[0xd0, i as i8 as u8]);
    } else if i >= i16::MIN as i64 {
        out.push(0xd1);
        out.extend_from_slice(&(i as i16).to_be_bytes());
    } else if i >= i32::MIN as i64 {
        out.push(0xd2);
        out.extend_from_slice(&(i as i32).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&i.to_be_bytes());
    }
}

fn write_uint(out: &mut Vec<u8>, u: u64) {
    if u < 128 {
        out.push(u as u8);
    } else if u <= u8::MAX as u64 {
        out.extend_from_slice(&[0xcc, u as u8]);
    } else if u <= u16::MAX as u64 {
        out.push(0xcd);
        out.extend_from_slice(&(u as u16).to_be_bytes());
    } else if u <= u32::MAX as u64 {
        out.push(0xce);
        out.extend_from_slice(&(u as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&u.to_be_bytes());
    }
}

fn write(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Nil => out.push(0xc0),
        Value::Bool(false) => out.push(0xc2),
        Value::Bool(true) => out.push(0xc3),
        Value::Int(i) => write_int(out, *i),
        Value::UInt(u) => write_uint(out, *u),
        Value::Float(f) => {
            out.push(0xcb);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(s) => {
            write_len(out, s.len(), Some((0xa0, 31)), Some(0xd9), 0xda, 0xdb);
            out.extend_from_slice(s.as_bytes());
        }
        Value::Bin(b) => {
            write_len(out, b.len(), None, Some(0xc4), 0xc5, 0xc6);
            out.extend_from_slice(b);
        }
        Value::Array(items) => {
            write_len(out, items.len(), Some((0x90, 15)), None, 0xdc, 0xdd);
            for item in items {
                write(out, item);
            }
        }
        Value::Map(items) => {
            write_len(out, items.len(), Some((0x80, 15)), None, 0xde, 0xdf);
            for (k, v) in items {
                write(out, k);
                write(out, v);
            }
        }
    }
}

/// Decode exactly one value that must span all of `data`.
pub fn decode(data: &[u8]) -> Result<Value, String> {
    let mut reader = Reader { data, pos: 0 };
    let value = reader.value(0)?;
    reader.finish()?;
    Ok(value)
}

/// Check that `data` is exactly one msgpack value that [`decode`] accepts, without building
/// it (no allocation).
pub fn validate(data: &[u8]) -> Result<(), String> {
    let mut reader = Reader { data, pos: 0 };
    reader.skip(0)?;
    reader.finish()
}

/// The encoded value of each of `keys` in the map `data` holds (the first entry with that
/// string key, as [`Value::get`] finds it), borrowed from `data`; every key is `None` when
/// `data` is not a map. All of `data` is checked as [`decode`] would check it, but nothing is
/// built: looking up a few fields of a packed dict costs no allocation.
pub fn lookup<'a, const N: usize>(
    data: &'a [u8],
    keys: [&str; N],
) -> Result<[Option<&'a [u8]>; N], String> {
    let mut found = [None; N];
    let mut reader = Reader { data, pos: 0 };
    let len = match data.first() {
        Some(&m @ 0x80..=0x8f) => {
            reader.pos = 1;
            (m & 0x0f) as usize
        }
        Some(0xde) => {
            reader.pos = 1;
            reader.len(2)?
        }
        Some(0xdf) => {
            reader.pos = 1;
            reader.len(4)?
        }
        _ => {
            reader.skip(0)?;
            reader.finish()?;
            return Ok(found);
        }
    };
    for _ in 0..len {
        let key_start = reader.pos;
        reader.skip(1)?;
        let key = str_at(&data[key_start..reader.pos]);
        let start = reader.pos;
        reader.skip(1)?;
        if let Some(k) = key {
            for (slot, want) in found.iter_mut().zip(keys) {
                if slot.is_none() && k == want {
                    *slot = Some(&data[start..reader.pos]);
                }
            }
        }
    }
    reader.finish()?;
    Ok(found)
}

/// The string one whole, valid msgpack value `raw` holds, if it is a string.
pub fn str_at(raw: &[u8]) -> Option<&str> {
    let (&marker, rest) = raw.split_first()?;
    let body = match marker {
        0xa0..=0xbf => rest,
        0xd9 => rest.get(1..)?,
        0xda => rest.get(2..)?,
        0xdb => rest.get(4..)?,
        _ => return None,
    };
    std::str::from_utf8(body).ok()
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                format!(
                    "truncated msgpack data: need {n} bytes at offset {}",
                    self.pos
                )
            })?;
        let slice = &self.data[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut buf = [0u8; N];
        buf.copy_from_slice(self.take(N)?);
        Ok(buf)
    }

    fn len(&mut self, width: usize) -> Result<usize, String> {
        Ok(match width {
            1 => self.byte()? as usize,
            2 => u16::from_be_bytes(self.be()?) as usize,
            _ => u32::from_be_bytes(self.be()?) as usize,
        })
    }

    fn finish(&self) -> Result<(), String> {
        if self.pos != self.data.len() {
            return Err(format!(
                "{} trailing bytes after the msgpack value",
                self.data.len() - self.pos
            ));
        }
        Ok(())
    }

    /// Step over one value, checking it as [`Reader::value`] would.
    fn skip(&mut self, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("msgpack nesting deeper than {MAX_DEPTH}"));
        }
        let marker = self.byte()?;
        let (items, body) = match marker {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => (0, 0),
            0x80..=0x8f => (2 * (marker & 0x0f) as usize, 0),
            0x90..=0x9f => ((marker & 0x0f) as usize, 0),
            0xa0..=0xbf => return self.skip_str((marker & 0x1f) as usize),
            0xc4..=0xc6 => (0, self.len(1 << (marker - 0xc4))?),
            0xca => (0, 4),
            0xcb => (0, 8),
            0xcc..=0xcf => (0, 1 << (marker - 0xcc)),
            0xd0..=0xd3 => (0, 1 << (marker - 0xd0)),
            0xd9..=0xdb => {
                let n = self.len(1 << (marker - 0xd9))?;
                return self.skip_str(n);
            }
            0xdc => (self.len(2)?, 0),
            0xdd => (self.len(4)?, 0),
            0xde => (2 * self.len(2)?, 0),
            0xdf => (2 * self.len(4)?, 0),
            0xc1 => return Err("reserved msgpack marker 0xc1".into()),
            0xc7..=0xc9 | 0xd4..=0xd8 => {
                return Err(format!(
                    "msgpack extension type (marker {marker:#04x}) is not supported"
                ))
            }
        };
        self.take(body)?;
        for _ in 0..items {
            self.skip(depth + 1)?;
        }
        Ok(())
    }

    fn skip_str(&mut self, len: usize) -> Result<(), String> {
        let raw = self.take(len)?;
        std::str::from_utf8(raw)
            .map(drop)
            .map_err(|e| format!("invalid utf-8 in msgpack string: {e}"))
    }

    fn string(&mut self, len: usize) -> Result<Value, String> {
        let raw = self.take(len)?;
        std::str::from_utf8(raw)
            .map(|s| Value::Str(s.to_owned()))
            .map_err(|e| format!("invalid utf-8 in msgpack string: {e}"))
    }

    fn array(&mut self, len: usize, depth: usize) -> Result<Value, String> {
        // Every element takes at least one byte: never preallocate more than what remains.
        let mut items = Vec::with_capacity(len.min(self.data.len() - self.pos));
        for _ in 0..len {
            items.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, len: usize, depth: usize) -> Result<Value, String> {
        let mut items = Vec::with_capacity(len.min((self.data.len() - self.pos) / 2));
        for _ in 0..len {
            let k = self.value(depth + 1)?;
            let v = self.value(depth + 1)?;
            items.push((k, v));
        }
        Ok(Value::Map(items))
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err(format!("msgpack nesting deeper than {MAX_DEPTH}"));
        }
        let marker = self.byte()?;
        Ok(match marker {
            0x00..=0x7f => Value::Int(marker as i64),
            0x80..=0x8f => return self.map((marker & 0x0f) as usize, depth),
            0x90..=0x9f => return self.array((marker & 0x0f) as usize, depth),
            0xa0..=0xbf => return self.string((marker & 0x1f) as usize),
            0xc0 => Value::Nil,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4..=0xc6 => {
                let n = self.len(1 << (marker - 0xc4))?;
                Value::Bin(self.take(n)?.to_vec())
            }
            0xca => Value::Float(f32::from_be_bytes(self.be()?) as f64),
            0xcb => Value::Float(f64::from_be_bytes(self.be()?)),
            0xcc => Value::Int(self.byte()? as i64),
            0xcd => Value::Int(u16::from_be_bytes(self.be()?) as i64),
            0xce => Value::Int(u32::from_be_bytes(self.be()?) as i64),
            0xcf => {
                let u = u64::from_be_bytes(self.be()?);
                i64::try_from(u).map(Value::Int).unwrap_or(Value::UInt(u))
            }
            0xd0 => Value::Int(i8::from_be_bytes(self.be()?) as i64),
            0xd1 => Value::Int(i16::from_be_bytes(self.be()?) as i64),
            0xd2 => Value::Int(i32::from_be_bytes(self.be()?) as i64),
            0xd3 => Value::Int(i64::from_be_bytes(self.be()?)),
            0xd9..=0xdb => {
                let n = self.len(1 << (marker - 0xd9))?;
                return self.string(n);
            }
            0xdc | 0xdd => {
                let n = self.len(if marker == 0xdc { 2 } else { 4 })?;
                return self.array(n, depth);
            }
            0xde | 0xdf => {
                let n = self.len(if marker == 0xde { 2 } else { 4 })?;
                return self.map(n, depth);
            }
            0xe0..=0xff => Value::Int(marker as i8 as i64),
            0xc1 => return Err("reserved msgpack marker 0xc1".into()),
            0xc7..=0xc9 | 0xd4..=0xd8 => {
                return Err(format!(
                    "msgpack extension type (marker {marker:#04x}) is not supported"
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_use_smallest_encoding() {
        assert_eq!(encode(&Value::Int(5)), vec![5]);
        assert_eq!(encode(&Value::Int(-1)), vec![0xff]);
        assert_eq!(encode(&Value::Int(200)), vec![0xcc, 200]);
        assert_eq!(encode(&Value::Int(-100)), vec![0xd0, (-100i8) as u8]);
        assert_eq!(encode(&Value::Int(70000)), vec![0xce, 0, 1, 0x11, 0x70]);
    }

    #[test]
    fn strings_and_maps() {
        let v = Value::map([("a", Value::from("xy"))]);
        assert_eq!(encode(&v), vec![0x81, 0xa1, b'a', 0xa2, b'x', b'y']);
        assert_eq!(decode(&encode(&v)).unwrap(), v);
        let long = "x".repeat(40);
        assert_eq!(encode(&Value::from(long.as_str()))[..2], [0xd9, 40]);
    }

    #[test]
    fn rejects_truncation_trailing_and_depth() {
        assert!(decode(&[0x92, 0x01]).is_err());
        assert!(decode(&[0x01, 0x02]).is_err());
        assert!(decode(&[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
        let deep = vec![0x91u8; MAX_DEPTH + 10];
        assert!(decode(&deep).is_err());
        assert!(decode(&[0xa2, 0xff, 0xfe]).is_err());
        assert!(decode(&[0xd4, 0x01, 0x02]).is_err());
        assert!(decode(&[]).is_err());
    }

    /// `validate` and `lookup` accept exactly what `decode` accepts, and `lookup` finds what
    /// `Value::get` finds.
    #[test]
    fn validate_and_lookup_agree_with_decode() {
        let deep = vec![0x91u8; MAX_DEPTH + 10];
        let v = Value::map([
            ("msg_id", Value::from("abc")),
            ("n", Value::Int(-70000)),
            ("f", Value::Float(1.5)),
            ("b", Value::Bin(vec![1, 2, 3])),
            (
                "l",
                Value::Array(vec![Value::Nil, Value::Bool(true), Value::UInt(u64::MAX)]),
            ),
            ("msg_id", Value::from("second")),
            ("s", Value::from("x".repeat(300).as_str())),
        ]);
        let good = encode(&v);
        let cases: Vec<Vec<u8>> = vec![
            good.clone(),
            good[..good.len() - 1].to_vec(),
            [good.as_slice(), &[0]].concat(),
            vec![0x92, 0x01],
            vec![0x01, 0x02],
            vec![0xdd, 0xff, 0xff, 0xff, 0xff],
            vec![0xdf, 0xff, 0xff, 0xff, 0xff],
            deep,
            vec![0xa2, 0xff, 0xfe],
            vec![0x81, 0xa2, 0xff, 0xfe, 0x01],
            vec![0xd4, 0x01, 0x02],
            vec![0xc1],
            vec![],
            vec![0x81, 0x01, 0xa1, b'x'],
            encode(&Value::from("not a map")),
        ];
        for data in &cases {
            let decoded = decode(data);
            assert_eq!(validate(data).is_ok(), decoded.is_ok(), "{data:02x?}");
            let found = lookup(data, ["msg_id", "n", "zz"]);
            assert_eq!(found.is_ok(), decoded.is_ok(), "{data:02x?}");
            if let (Ok(value), Ok(found)) = (decoded, found) {
                for (raw, key) in found.iter().zip(["msg_id", "n", "zz"]) {
                    let got = raw.map(|r| decode(r).expect("a whole value"));
                    assert_eq!(got.as_ref(), value.get(key), "{key}");
                }
            }
        }
        let found = lookup(&good, ["msg_id", "s", "b"]).expect("valid");
        assert_eq!(found[0].and_then(str_at), Some("abc"));
        assert_eq!(found[1].and_then(str_at), Some("x".repeat(300).as_str()));
        assert_eq!(found[2].and_then(str_at), None);
    }
}
