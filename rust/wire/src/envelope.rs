//! Splitting a multipart message into its envelope parts.

use crate::{Auth, Packer, Parts, WireError};

/// The frame that separates routing identities from the message.
pub const DELIMITER: &[u8] = b"<IDS|MSG>";

/// Size limits applied before anything is verified or unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted packed dict part (header, parent_header, metadata or content).
    pub max_part: usize,
    /// Most frames accepted in one message.
    pub max_frames: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_part: 256 << 20,
            max_frames: 1 << 16,
        }
    }
}

/// A message split into its frames, not yet verified or unpacked. `F` is any frame type
/// (`Vec<u8>`, a zmq message, a borrowed slice…), so splitting never copies payloads.
#[derive(Debug)]
pub struct Envelope<F> {
    pub idents: Vec<F>,
    pub signature: F,
    pub header: F,
    pub parent_header: F,
    pub metadata: F,
    pub content: F,
    pub buffers: Vec<F>,
}

/// Split frames at the first delimiter. Checks frame counts and part sizes.
pub fn split_envelope<F: AsRef<[u8]>>(
    frames: Vec<F>,
    limits: &Limits,
) -> Result<Envelope<F>, WireError> {
    if frames.len() > limits.max_frames {
        return Err(WireError::Oversized {
            what: "frame count",
            size: frames.len(),
            limit: limits.max_frames,
        });
    }
    let pos = frames
        .iter()
        .position(|f| f.as_ref() == DELIMITER)
        .ok_or(WireError::NoDelimiter)?;
    let after = frames.len() - pos - 1;
    if after < 5 {
        return Err(WireError::TooFewFrames { got: after });
    }
    let mut rest = frames.into_iter();
    let idents: Vec<F> = rest.by_ref().take(pos).collect();
    let mut next = || rest.next().ok_or(WireError::TooFewFrames { got: after });
    let _delimiter = next()?;
    let signature = next()?;
    let header = next()?;
    let parent_header = next()?;
    let metadata = next()?;
    let content = next()?;
    let buffers: Vec<F> = rest.collect();
    for (what, part) in [
        ("signature", &signature),
        ("header", &header),
        ("parent_header", &parent_header),
        ("metadata", &metadata),
        ("content", &content),
    ] {
        let size = part.as_ref().len();
        if size > limits.max_part {
            return Err(WireError::Oversized {
                what,
                size,
                limit: limits.max_part,
            });
        }
    }
    Ok(Envelope {
        idents,
        signature,
        header,
        parent_header,
        metadata,
        content,
        buffers,
    })
}

impl<F: AsRef<[u8]>> Envelope<F> {
    /// The four packed parts in signing order.
    pub fn packed_parts(&self) -> [&[u8]; 4] {
        [
            self.header.as_ref(),
            self.parent_header.as_ref(),
            self.metadata.as_ref(),
            self.content.as_ref(),
        ]
    }

    /// Verify the signature (see [`Auth::verify`]).
    pub fn verify(&self, auth: &mut Auth, record: bool) -> Result<(), WireError> {
        auth.verify(self.signature.as_ref(), &self.packed_parts(), record)
    }

    /// Verify the signature and, when the signed metadata carries a buffers digest
    /// ([`crate::BUFFERS_DIGEST_KEY`]), the buffers. With `record`, the signature enters the
    /// replay history only once both checks passed. The metadata is unpacked only when its
    /// packed bytes can hold a digest, so messages without one cost nothing extra.
    pub fn verify_with_buffers(
        &self,
        auth: &mut Auth,
        packer: Packer,
        record: bool,
    ) -> Result<(), WireError> {
        auth.verify(self.signature.as_ref(), &self.packed_parts(), false)?;
        if auth.is_signing() && may_hold_buffers_digest(self.metadata.as_ref()) {
            let metadata = packer.unpack(self.metadata.as_ref(), "metadata")?;
            auth.check_buffers(&metadata, self.buffers.iter().map(AsRef::as_ref))?;
        }
        if record {
            auth.record(self.signature.as_ref())?;
        }
        Ok(())
    }

    /// Unpack all four parts. The header must be a map with a string `msg_type`.
    pub fn unpack(&self, packer: Packer) -> Result<Parts, WireError> {
        let header = packer.unpack(self.header.as_ref(), "header")?;
        check_header(&header)?;
        let parent_header = packer.unpack(self.parent_header.as_ref(), "parent_header")?;
        let metadata = packer.unpack(self.metadata.as_ref(), "metadata")?;
        let content = packer.unpack(self.content.as_ref(), "content")?;
        for (field, v) in [("parent_header", &parent_header), ("metadata", &metadata)] {
            if !matches!(v, crate::Value::Map(_)) {
                return Err(WireError::BadField {
                    field,
                    reason: "must be a map".into(),
                });
            }
        }
        Ok(Parts {
            header,
            parent_header,
            metadata,
            content,
        })
    }
}

/// True when packed metadata may contain the buffers digest key. Both packers store map keys
/// as plain UTF-8, so its absence proves the key is absent (only a key holder could hide it
/// with JSON escapes, and it then only skips a check of its own message).
pub fn may_hold_buffers_digest(packed_metadata: &[u8]) -> bool {
    let key = crate::BUFFERS_DIGEST_KEY.as_bytes();
    packed_metadata.windows(key.len()).any(|w| w == key)
}

/// A header must be a map holding string `msg_id` and `msg_type`.
pub fn check_header(header: &crate::Value) -> Result<(), WireError> {
    if !matches!(header, crate::Value::Map(_)) {
        return Err(WireError::BadField {
            field: "header",
            reason: "must be a map".into(),
        });
    }
    for field in ["msg_id", "msg_type"] {
        if header.get(field).and_then(|v| v.as_str()).is_none() {
            return Err(WireError::BadField {
                field: if field == "msg_id" {
                    "header.msg_id"
                } else {
                    "header.msg_type"
                },
                reason: "missing or not a string".into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Value;

    fn frames(n_after: usize) -> Vec<Vec<u8>> {
        let mut f = vec![b"id".to_vec(), DELIMITER.to_vec()];
        f.extend((0..n_after).map(|i| vec![i as u8]));
        f
    }

    #[test]
    fn splits_idents_parts_and_buffers() {
        let env = split_envelope(frames(7), &Limits::default()).unwrap();
        assert_eq!(env.idents, vec![b"id".to_vec()]);
        assert_eq!(env.signature, vec![0]);
        assert_eq!(env.content, vec![4]);
        assert_eq!(env.buffers, vec![vec![5], vec![6]]);
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let l = Limits::default();
        assert_eq!(
            split_envelope(vec![b"x".to_vec()], &l).unwrap_err(),
            WireError::NoDelimiter
        );
        assert_eq!(
            split_envelope(frames(4), &l).unwrap_err(),
            WireError::TooFewFrames { got: 4 }
        );
        let small = Limits {
            max_part: 0,
            max_frames: 100,
        };
        assert!(matches!(
            split_envelope(frames(5), &small),
            Err(WireError::Oversized { .. })
        ));
        let few = Limits {
            max_part: 10,
            max_frames: 3,
        };
        assert!(matches!(
            split_envelope(frames(5), &few),
            Err(WireError::Oversized { .. })
        ));
        let empty: Vec<Vec<u8>> = Vec::new();
        assert_eq!(
            split_envelope(empty, &l).unwrap_err(),
            WireError::NoDelimiter
        );
    }

    #[test]
    fn buffers_are_checked_when_the_metadata_names_a_digest() {
        let key = b"k";
        let signer = Auth::new(key, "hmac-sha256").unwrap();
        let build = |id: &str, buffers: &[&[u8]], digest_of: &[&[u8]]| {
            let md = Value::map([(
                crate::BUFFERS_DIGEST_KEY,
                Value::Str(signer.buffers_digest(digest_of.iter().copied()).unwrap()),
            )]);
            let parts = crate::Parts {
                header: Value::map([("msg_id", Value::from(id)), ("msg_type", Value::from("t"))]),
                parent_header: Value::empty_map(),
                metadata: md,
                content: Value::empty_map(),
            };
            let packed = parts.pack(Packer::Msgpack).unwrap();
            let refs = [&packed[0][..], &packed[1], &packed[2], &packed[3]];
            let mut f = vec![DELIMITER.to_vec(), signer.sign(&refs)];
            f.extend(packed);
            f.extend(buffers.iter().map(|b| b.to_vec()));
            split_envelope(f, &Limits::default()).unwrap()
        };
        let mut auth = Auth::new(key, "hmac-sha256").unwrap();
        let good = build("a", &[b"x", b"y"], &[b"x", b"y"]);
        assert_eq!(
            good.verify_with_buffers(&mut auth, Packer::Msgpack, true),
            Ok(())
        );
        assert_eq!(
            good.verify_with_buffers(&mut auth, Packer::Msgpack, true),
            Err(WireError::DuplicateSignature)
        );
        let swapped = build("b", &[b"x", b"z"], &[b"x", b"y"]);
        assert_eq!(
            swapped.verify_with_buffers(&mut auth, Packer::Msgpack, true),
            Err(WireError::InvalidSignature)
        );
        // A rejected message is not recorded: the genuine one still passes afterwards.
        let genuine = build("b", &[b"x", b"y"], &[b"x", b"y"]);
        assert!(genuine.verify(&mut auth, false).is_ok());
        let stripped = build("c", &[], &[b"x"]);
        assert!(stripped
            .verify_with_buffers(&mut auth, Packer::Msgpack, false)
            .is_err());
    }

    #[test]
    fn header_must_name_its_type() {
        assert!(check_header(&Value::Int(1)).is_err());
        assert!(check_header(&Value::map([("msg_id", Value::from("a"))])).is_err());
        let ok = Value::map([("msg_id", Value::from("a")), ("msg_type", Value::from("b"))]);
        assert!(check_header(&ok).is_ok());
    }
}
