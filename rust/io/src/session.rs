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
    auth: Mutex<Auth>,
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
        Ok(SessionCore {
            headers: HeaderFactory::new(session, username),
            packer,
            key,
            signature_scheme: signature_scheme.to_owned(),
            limits,
            auth: Mutex::new(auth),
        })
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
        let (sig, packed) = self.pack_and_sign(&msg.parts)?;
        let mut frames = Vec::with_capacity(msg.idents.len() + 6 + msg.buffers.len());
        frames.extend(msg.idents.into_iter().map(OutFrame::Owned));
        frames.push(OutFrame::Owned(DELIMITER.to_vec()));
        frames.push(OutFrame::Owned(sig));
        frames.extend(packed.into_iter().map(OutFrame::Owned));
        frames.extend(msg.buffers);
        Ok(frames)
    }

    /// Verify an envelope's signature (recording it in the replay history when `record`).
    pub fn verify<F: AsRef<[u8]>>(
        &self,
        env: &fp_wire::Envelope<F>,
        record: bool,
    ) -> Result<(), WireError> {
        env.verify(&mut self.auth(), record)
    }

    /// Split, verify (recording the signature) and unpack received frames.
    pub fn parse<F: AsRef<[u8]>>(
        &self,
        frames: Vec<F>,
        unpack_content: bool,
        record: bool,
    ) -> Result<(Vec<F>, Parts, Vec<F>), WireError> {
        let env = split_envelope(frames, &self.limits)?;
        env.verify(&mut self.auth(), record)?;
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
        Ok((env.idents, parts, env.buffers))
    }
}
