use fp_wire::{
    split_envelope, Auth, HeaderFactory, Limits, Packer, Parts, Value, WireError, DELIMITER,
};
use std::sync::Mutex;

use crate::outframe::OutFrame;

/// Everything needed to sign, pack and verify messages for one session. Shared (behind an
/// `Arc`) by the Python `Session` object and the I/O threads that use it, so one replay history
/// covers all of a session's sockets.
#[derive(Debug)]
pub struct SessionCore {
    pub headers: HeaderFactory,
    pub packer: Packer,
    pub key: Vec<u8>,
    pub signature_scheme: String,
    pub limits: Limits,
    /// Put a digest of the buffers into the signed metadata of messages sent with buffers
    /// (`metadata["buffers_mac"]`, see [`fp_wire::Auth::buffers_digest`]). On by default.
    /// Received digests are always checked, whatever this says.
    pub sign_buffers: bool,
    auth: Mutex<Auth>,
    /// The same key without a replay history, for buffer digests: hashing large buffers must
    /// not hold the lock that signing and verifying on other threads need.
    buffers_auth: Auth,
}

/// Metadata key that [`SessionCore::parse_answerable`] sets (locally, after verifying the
/// signature) on a message delivered without its buffers because they did not match their
/// signed digest.
pub const BUFFERS_CHANGED_KEY: &str = "fp_buffers_changed";

/// Environment variable that turns sending buffer digests off (`0`, `false`, `no`, `off`) in
/// every process that inherits it: clients, engines and the controller.
pub const SIGN_BUFFERS_ENV: &str = "FERROPARALLEL_SIGN_BUFFERS";

/// Whether sessions add buffer digests by default: yes unless [`SIGN_BUFFERS_ENV`] says no.
pub fn sign_buffers_default() -> bool {
    match std::env::var(SIGN_BUFFERS_ENV) {
        Ok(v) => !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "no" | "off"
        ),
        Err(_) => true,
    }
}

/// A message to be built and sent by the I/O thread.
pub struct OutgoingMessage {
    pub idents: Vec<Vec<u8>>,
    pub parts: Parts,
    pub buffers: Vec<OutFrame>,
}

impl SessionCore {
    pub fn new(
        key: Vec<u8>,
        packer: Packer,
        signature_scheme: &str,
        session: String,
        username: String,
        history_size: usize,
        limits: Limits,
    ) -> Result<SessionCore, WireError> {
        let auth = Auth::with_history(&key, signature_scheme, history_size)?;
        let buffers_auth = Auth::with_history(&key, signature_scheme, 1)?;
        Ok(SessionCore {
            headers: HeaderFactory::new(session, username),
            packer,
            key,
            signature_scheme: signature_scheme.to_owned(),
            limits,
            sign_buffers: true,
            auth: Mutex::new(auth),
            buffers_auth,
        })
    }

    /// The same session, adding buffer digests to sent messages or not.
    pub fn with_sign_buffers(mut self, on: bool) -> SessionCore {
        self.sign_buffers = on;
        self
    }

    /// Add the digest of `buffers` to `parts.metadata` when this session signs buffers, has a
    /// key, and there is at least one buffer.
    pub fn add_buffers_digest<'a, I>(&self, parts: &mut Parts, buffers: I)
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        if !self.sign_buffers || self.key.is_empty() {
            return;
        }
        let mut buffers = buffers.into_iter().peekable();
        if buffers.peek().is_none() {
            return;
        }
        if let Some(digest) = self.buffers_auth.buffers_digest(buffers) {
            parts
                .metadata
                .set(fp_wire::BUFFERS_DIGEST_KEY, Value::Str(digest));
        }
    }

    /// The keyed MAC (hex) of `buffers` that `metadata["buffers_mac"]` carries, `None`
    /// without a key (for a data channel that sends the MAC after the buffers).
    pub fn buffers_digest<'a, I>(&self, buffers: I) -> Option<String>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        self.buffers_auth.buffers_digest(buffers)
    }

    /// The key of the data stream's MAC (see [`fp_wire::Auth::stream_key`]); `None` without
    /// a key.
    pub fn stream_key(&self) -> Option<fp_wire::StreamKey> {
        self.buffers_auth.stream_key()
    }

    fn auth(&self) -> std::sync::MutexGuard<'_, Auth> {
        // A panic while holding this lock cannot leave Auth inconsistent in a harmful way.
        self.auth.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pack the four parts and sign them: `(signature, [header, parent, metadata, content])`.
    pub fn pack_and_sign(&self, parts: &Parts) -> Result<(Vec<u8>, [Vec<u8>; 4]), WireError> {
        let packed = parts.pack(self.packer)?;
        let sig = self
            .auth()
            .sign(&[&packed[0], &packed[1], &packed[2], &packed[3]]);
        Ok((sig, packed))
    }

    /// Sign four already packed parts.
    pub fn sign_packed(&self, parts: &[&[u8]; 4]) -> Vec<u8> {
        self.auth().sign(parts)
    }

    /// All frames of a message, in wire order.
    pub fn build_frames(&self, msg: OutgoingMessage) -> Result<Vec<OutFrame>, WireError> {
        self.build_frames_with_parent(msg, None)
    }

    /// [`build_frames`](Self::build_frames) with the parent header already packed (with this
    /// session's packer, e.g. the header frame of the request being answered, as received):
    /// it is sent as it is, and `msg.parts.parent_header` is ignored.
    pub fn build_frames_with_parent(
        &self,
        mut msg: OutgoingMessage,
        packed_parent: Option<Vec<u8>>,
    ) -> Result<Vec<OutFrame>, WireError> {
        self.add_buffers_digest(&mut msg.parts, msg.buffers.iter().map(OutFrame::bytes));
        let (sig, packed) = match packed_parent {
            None => self.pack_and_sign(&msg.parts)?,
            Some(parent) => {
                let p = self.packer;
                let packed = [
                    p.pack(&msg.parts.header)?,
                    parent,
                    p.pack(&msg.parts.metadata)?,
                    p.pack(&msg.parts.content)?,
                ];
                let sig = self
                    .auth()
                    .sign(&[&packed[0], &packed[1], &packed[2], &packed[3]]);
                (sig, packed)
            }
        };
        let mut frames = Vec::with_capacity(msg.idents.len() + 6 + msg.buffers.len());
        frames.extend(msg.idents.into_iter().map(OutFrame::Owned));
        frames.push(OutFrame::Owned(DELIMITER.to_vec()));
        frames.push(OutFrame::Owned(sig));
        frames.extend(packed.into_iter().map(OutFrame::Owned));
        frames.extend(msg.buffers);
        Ok(frames)
    }

    /// Verify an envelope's signature and, when its metadata carries one, the buffers digest
    /// (recording the signature in the replay history when `record`).
    pub fn verify<F: AsRef<[u8]>>(
        &self,
        env: &fp_wire::Envelope<F>,
        record: bool,
    ) -> Result<(), WireError> {
        env.verify_with_buffers(&mut self.auth(), self.packer, record)
    }

    /// Verify an envelope's signature only (recording it in the replay history when
    /// `record`): for a receiver that forwards buffers without looking at them and checks
    /// them with [`SessionCore::check_packed_buffers`] before it vouches for them.
    pub fn verify_signature<F: AsRef<[u8]>>(
        &self,
        env: &fp_wire::Envelope<F>,
        record: bool,
    ) -> Result<(), WireError> {
        env.verify(&mut self.auth(), record)
    }

    /// Check buffers against the digest in their message's packed metadata (as signed when
    /// the message arrived); `Ok` when the metadata carries none (peers that send no digest).
    pub fn check_packed_buffers<'a, I>(
        &self,
        packed_metadata: Option<&[u8]>,
        buffers: I,
    ) -> Result<(), WireError>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let Some(packed) = packed_metadata else {
            return Ok(());
        };
        if !fp_wire::may_hold_buffers_digest(packed) {
            return Ok(());
        }
        let metadata = self.packer.unpack(packed, "metadata")?;
        self.buffers_auth.check_buffers(&metadata, buffers)
    }

    /// Split, verify (signature and buffers digest; recording the signature) and unpack
    /// received frames.
    pub fn parse<F: AsRef<[u8]>>(
        &self,
        frames: Vec<F>,
        unpack_content: bool,
        record: bool,
    ) -> Result<(Vec<F>, Parts, Vec<F>), WireError> {
        self.parse_inner(frames, unpack_content, record, false)
            .map(|(idents, parts, buffers, _)| (idents, parts, buffers))
    }

    /// [`parse`](Self::parse) for a process that answers what it receives: a message whose
    /// signature is valid but whose buffers do not match their signed digest (their sender
    /// changed an array while it was being sent, or they were altered on the way) is not
    /// dropped, which would leave its sender waiting forever, but delivered without its
    /// buffers and with [`BUFFERS_CHANGED_KEY`] set in its metadata, so that the receiver
    /// can answer with an error. Nothing from the unverified buffers is ever delivered.
    pub fn parse_answerable<F: AsRef<[u8]>>(
        &self,
        frames: Vec<F>,
    ) -> Result<(Vec<F>, Parts, Vec<F>), WireError> {
        self.parse_inner(frames, true, true, true)
            .map(|(idents, parts, buffers, _)| (idents, parts, buffers))
    }

    /// [`parse_answerable`](Self::parse_answerable) that also returns the header frame as
    /// received (packed): a reply can name it as its parent without packing it again (see
    /// [`SessionCore::build_frames_with_parent`]).
    #[allow(clippy::type_complexity)]
    pub fn parse_answerable_keeping_header<F: AsRef<[u8]>>(
        &self,
        frames: Vec<F>,
    ) -> Result<(Vec<F>, Parts, Vec<F>, F), WireError> {
        self.parse_inner(frames, true, true, true)
    }

    #[allow(clippy::type_complexity)]
    fn parse_inner<F: AsRef<[u8]>>(
        &self,
        frames: Vec<F>,
        unpack_content: bool,
        record: bool,
        answerable: bool,
    ) -> Result<(Vec<F>, Parts, Vec<F>, F), WireError> {
        let env = split_envelope(frames, &self.limits)?;
        env.verify(&mut self.auth(), false)?;
        let parts = if unpack_content {
            env.unpack(self.packer)?
        } else {
            let header = self.packer.unpack(env.header.as_ref(), "header")?;
            fp_wire::check_header_value(&header)?;
            Parts {
                header,
                parent_header: self
                    .packer
                    .unpack(env.parent_header.as_ref(), "parent_header")?,
                metadata: self.packer.unpack(env.metadata.as_ref(), "metadata")?,
                content: Value::Nil,
            }
        };
        let mut parts = parts;
        let mut buffers = env.buffers;
        let checked = self
            .buffers_auth
            .check_buffers(&parts.metadata, buffers.iter().map(AsRef::as_ref));
        match checked {
            Ok(()) => {}
            Err(WireError::InvalidSignature) if answerable => {
                buffers.clear();
                if let Value::Map(_) = parts.metadata {
                    parts.metadata.set(BUFFERS_CHANGED_KEY, Value::Bool(true));
                } else {
                    parts.metadata = Value::map([(BUFFERS_CHANGED_KEY, Value::Bool(true))]);
                }
                // not recorded: if these buffers were swapped on the way, the genuine message
                // (same signature) must still be accepted when it comes
                return Ok((env.idents, parts, buffers, env.header));
            }
            Err(e) => return Err(e),
        }
        if record {
            self.auth().record(env.signature.as_ref())?;
        }
        Ok((env.idents, parts, buffers, env.header))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core(sign_buffers: bool) -> SessionCore {
        SessionCore::new(
            b"key".to_vec(),
            Packer::Msgpack,
            "hmac-sha256",
            "s".into(),
            "u".into(),
            100,
            Limits::default(),
        )
        .unwrap()
        .with_sign_buffers(sign_buffers)
    }

    fn message(core: &SessionCore, buffers: &[&[u8]]) -> Vec<Vec<u8>> {
        let parts = Parts {
            header: core.headers.header("apply_request"),
            parent_header: Value::empty_map(),
            metadata: Value::empty_map(),
            content: Value::empty_map(),
        };
        let frames = core
            .build_frames(OutgoingMessage {
                idents: vec![b"id".to_vec()],
                parts,
                buffers: buffers
                    .iter()
                    .map(|b| OutFrame::Owned(b.to_vec()))
                    .collect(),
            })
            .unwrap();
        frames.iter().map(|f| f.bytes().to_vec()).collect()
    }

    /// A request's header frame kept by `parse_answerable_keeping_header` and given back as
    /// the parent of its reply makes the same frames as the parsed header packed again.
    #[test]
    fn packed_parent_makes_the_same_frames() {
        let tx = core(true);
        let rx = core(true);
        let request = message(&tx, &[b"one"]);
        let (_, parts, _, header) = rx.parse_answerable_keeping_header(request.clone()).unwrap();
        assert_eq!(header, request[3]);
        let reply = |packed: Option<Vec<u8>>| {
            let msg = OutgoingMessage {
                idents: vec![b"id".to_vec()],
                parts: Parts {
                    header: rx.headers.header_with_id("apply_reply", "r".into()),
                    parent_header: parts.header.clone(),
                    metadata: Value::map([("m", Value::Int(1))]),
                    content: Value::empty_map(),
                },
                buffers: vec![OutFrame::Owned(b"two".to_vec())],
            };
            let frames = rx.build_frames_with_parent(msg, packed).unwrap();
            frames
                .iter()
                .map(|f| f.bytes().to_vec())
                .collect::<Vec<_>>()
        };
        let (given, repacked) = (reply(Some(header.clone())), reply(None));
        // (the dates of the two headers may differ: compare all but the header and signature)
        assert_eq!(given[3..].len(), repacked[3..].len());
        assert_eq!(given[4..], repacked[4..]);
        assert_eq!(given[4], header);
        let (_, back, bufs) = tx.parse(given, true, true).unwrap();
        assert_eq!(back.parent_header, parts.header);
        assert_eq!(bufs.len(), 1);
    }

    #[test]
    fn buffers_are_signed_and_checked() {
        let tx = core(true);
        let rx = core(true);
        let mut frames = message(&tx, &[b"one", b"two"]);
        let (_, parts, bufs) = rx.parse(frames.clone(), true, true).unwrap();
        assert!(parts.metadata.get(fp_wire::BUFFERS_DIGEST_KEY).is_some());
        assert_eq!(bufs.len(), 2);
        // Swapped buffers are refused, and the refusal does not burn the genuine signature.
        let mut forged = frames.clone();
        *forged.last_mut().unwrap() = b"TWO".to_vec();
        let fresh = core(true);
        assert_eq!(
            fresh.parse(forged.clone(), true, true).unwrap_err(),
            WireError::InvalidSignature
        );
        assert!(fresh.parse(frames.clone(), true, true).is_ok());
        let env = split_envelope(forged, &Limits::default()).unwrap();
        assert_eq!(
            core(true).verify(&env, true),
            Err(WireError::InvalidSignature)
        );
        // Dropped buffers too.
        frames.pop();
        assert!(core(true).parse(frames, true, true).is_err());
    }

    #[test]
    fn answerable_delivery_flags_changed_buffers_and_keeps_none() {
        let tx = core(true);
        let frames = message(&tx, &[b"one", b"two"]);
        let mut changed = frames.clone();
        *changed.last_mut().unwrap() = b"TWO".to_vec();
        let rx = core(true);
        let (idents, parts, bufs) = rx.parse_answerable(changed.clone()).unwrap();
        assert_eq!(idents, vec![b"id".to_vec()]);
        assert!(bufs.is_empty(), "unverified buffers must not be delivered");
        assert_eq!(
            parts.metadata.get(BUFFERS_CHANGED_KEY),
            Some(&Value::Bool(true))
        );
        // its signature is not recorded (the buffers may have been swapped on the way): the
        // genuine message is still accepted, once, with its buffers and without the flag
        let (_, parts, bufs) = rx.parse_answerable(frames.clone()).unwrap();
        assert_eq!(bufs.len(), 2);
        assert!(parts.metadata.get(BUFFERS_CHANGED_KEY).is_none());
        assert_eq!(
            rx.parse_answerable(frames.clone()).unwrap_err(),
            WireError::DuplicateSignature
        );
        // a bad signature is still refused
        let mut forged = frames;
        forged[3] = b"{}".to_vec();
        assert!(core(true).parse_answerable(forged).is_err());
    }

    #[test]
    fn no_digest_without_buffers_or_when_disabled() {
        let rx = core(true);
        for (tx, bufs) in [(core(true), &[][..]), (core(false), &[&b"x"[..]][..])] {
            let frames = message(&tx, bufs);
            let (_, parts, _) = rx.parse(frames, true, true).unwrap();
            assert!(parts.metadata.get(fp_wire::BUFFERS_DIGEST_KEY).is_none());
        }
    }
}
