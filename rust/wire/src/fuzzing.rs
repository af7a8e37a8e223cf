//! Fuzzing harness for the wire parser, shared by the `cargo fuzz` target `wire_parse` and the
//! corpus regression test that runs on stable (`tests/fuzz_corpus.rs`). Not a public API.
//!
//! Input layout: one flags byte, then frames, each a length (one byte; `255` means a
//! little-endian `u16` follows) and that many bytes (fewer if the input ends). See
//! [`FrameReader`] and [`encode_frames`].

use crate::{
    split_envelope, Auth, Limits, Packer, Value, WireError, BUFFERS_DIGEST_KEY, DELIMITER,
};

/// The key used when a fuzz input asks for signing.
pub const KEY: &[u8] = b"fuzz-key";

/// Flags of the first input byte of [`wire_parse`].
pub mod flags {
    /// Verify with [`super::KEY`] (else no key: nothing is checked).
    pub const KEYED: u8 = 1;
    /// Parts are JSON (else msgpack).
    pub const JSON: u8 = 2;
    /// Replace the signature frame with the correct one before parsing.
    pub const SIGN: u8 = 4;
    /// Put the correct buffers digest into the metadata (repacked) before signing.
    pub const DIGEST: u8 = 8;
}

/// Reads length-prefixed frames from fuzz input.
pub struct FrameReader<'a> {
    data: &'a [u8],
}

impl<'a> FrameReader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        FrameReader { data }
    }

    /// The next byte, if any.
    pub fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    /// The next frame, if any input is left.
    pub fn frame(&mut self) -> Option<Vec<u8>> {
        let mut len = self.byte()? as usize;
        if len == 255 {
            let lo = self.byte().unwrap_or(0) as usize;
            let hi = self.byte().unwrap_or(0) as usize;
            len = lo | hi << 8;
        }
        let take = len.min(self.data.len());
        let (frame, rest) = self.data.split_at(take);
        self.data = rest;
        Some(frame.to_vec())
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Append frames in the layout [`FrameReader`] reads (for building seed inputs).
pub fn encode_frames(out: &mut Vec<u8>, frames: &[Vec<u8>]) {
    for f in frames {
        let len = f.len().min(u16::MAX as usize);
        if len < 255 {
            out.push(len as u8);
        } else {
            out.push(255);
            out.extend_from_slice(&(len as u16).to_le_bytes());
        }
        out.extend_from_slice(&f[..len]);
    }
}

/// Make a message in `frames` genuine for `auth`: optionally add the buffers digest to its
/// metadata (when that unpacks as a map), then put the right signature after the delimiter.
/// Frames without a delimiter and five parts after it are left alone.
pub fn make_genuine(frames: &mut [Vec<u8>], auth: &Auth, packer: Packer, digest: bool) {
    let Some(pos) = frames.iter().position(|f| f == DELIMITER) else {
        return;
    };
    if frames.len() < pos + 6 {
        return;
    }
    if digest {
        let buffers = &frames[pos + 6..];
        if let Some(d) = auth.buffers_digest(buffers.iter().map(Vec::as_slice)) {
            if let Ok(mut md @ Value::Map(_)) = packer.unpack(&frames[pos + 4], "metadata") {
                md.set(BUFFERS_DIGEST_KEY, Value::Str(d));
                if let Ok(packed) = packer.pack(&md) {
                    frames[pos + 4] = packed;
                }
            }
        }
    }
    let sig = auth.sign(&[
        &frames[pos + 2],
        &frames[pos + 3],
        &frames[pos + 4],
        &frames[pos + 5],
    ]);
    frames[pos + 1] = sig;
}

/// Packing what was unpacked must be stable: pack(unpack(pack(v))) == pack(v).
fn check_repack(packer: Packer, v: &Value) {
    let Ok(first) = packer.pack(v) else {
        return;
    };
    let again = packer
        .unpack(&first, "repack")
        .unwrap_or_else(|e| panic!("{} cannot read its own output: {e}", packer.name()));
    let second = packer
        .pack(&again)
        .unwrap_or_else(|e| panic!("{} cannot repack: {e}", packer.name()));
    assert_eq!(first, second, "{} packing is not stable", packer.name());
}

/// Split, verify and unpack one fuzz input with both packers; panics only on a real bug.
pub fn wire_parse(data: &[u8]) {
    let mut r = FrameReader::new(data);
    let flags = r.byte().unwrap_or(0);
    let packer = if flags & flags::JSON != 0 {
        Packer::Json
    } else {
        Packer::Msgpack
    };
    let key = if flags & flags::KEYED != 0 { KEY } else { b"" };
    let mut frames = Vec::new();
    while let Some(f) = r.frame() {
        frames.push(f);
        if frames.len() > 64 {
            break;
        }
    }
    let Ok(mut auth) = Auth::with_history(key, "hmac-sha256", 16) else {
        panic!("the fuzz key must be accepted");
    };
    if flags & flags::SIGN != 0 {
        make_genuine(&mut frames, &auth, packer, flags & flags::DIGEST != 0);
    }
    let limits = Limits {
        max_part: 1 << 16,
        max_frames: 48,
    };
    let Ok(env) = split_envelope(frames, &limits) else {
        return;
    };
    let first = env.verify_with_buffers(&mut auth, packer, true);
    if first.is_ok() && auth.is_signing() {
        // A second delivery of the same message is a replay.
        assert_eq!(
            env.verify_with_buffers(&mut auth, packer, true),
            Err(WireError::DuplicateSignature)
        );
    }
    if flags & flags::SIGN != 0 && key.is_empty() {
        assert!(first.is_ok(), "nothing is checked without a key");
    }
    for p in [Packer::Msgpack, Packer::Json] {
        if let Ok(parts) = env.unpack(p) {
            crate::check_header_value(&parts.header).expect("unpack checked the header");
            let _ = auth.check_buffers(&parts.metadata, env.buffers.iter().map(Vec::as_slice));
            for v in [
                &parts.header,
                &parts.parent_header,
                &parts.metadata,
                &parts.content,
            ] {
                check_repack(p, v);
            }
        }
        for part in env.packed_parts() {
            if let Ok(v) = p.unpack(part, "part") {
                let _ = (
                    v.get("msg_id"),
                    v.as_array(),
                    v.as_i64(),
                    v.as_f64(),
                    v.as_str(),
                );
                check_repack(p, &v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_the_input_layout() {
        let frames = vec![b"a".to_vec(), vec![7u8; 300], Vec::new()];
        let mut data = Vec::new();
        encode_frames(&mut data, &frames);
        let mut r = FrameReader::new(&data);
        let mut got = Vec::new();
        while let Some(f) = r.frame() {
            got.push(f);
        }
        assert_eq!(got, frames);
    }
}
