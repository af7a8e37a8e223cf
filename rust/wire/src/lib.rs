//! The ipyparallel message envelope, without any Python.
//!
//! A message on the wire is
//! `[idents…, b"<IDS|MSG>", hex-HMAC, header, parent_header, metadata, content, buffers…]`.
//! This crate builds and parses that envelope, signs and verifies it (HMAC-SHA256, constant-time
//! comparison, a bounded history of seen digests that rejects replays), packs and unpacks the
//! four dict parts with the `msgpack` or `json` packer, and creates headers. Every malformed
//! input is reported as a [`WireError`]; nothing here panics on data from the network.

mod envelope;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod header;
mod json;
mod msgpack;
mod packer;
mod sign;
mod value;

pub use envelope::{
    check_header as check_header_value, may_hold_buffers_digest, split_envelope, Envelope, Limits,
    DELIMITER,
};
pub use error::WireError;
pub use header::{iso_from_unix, iso_now, new_id, HeaderFactory, PROTOCOL_VERSION};
pub use packer::{Field, Packer};
pub use sign::{
    Auth, DigestHistory, GmacFailed, StreamDigest, StreamKey, StreamNonce, BUFFERS_DIGEST_KEY,
    DEFAULT_HISTORY_SIZE,
};
pub use value::Value;

/// The four packed dict parts of a message, in signing order.
#[derive(Debug, Clone, PartialEq)]
pub struct Parts {
    pub header: Value,
    pub parent_header: Value,
    pub metadata: Value,
    pub content: Value,
}

impl Parts {
    /// Pack all four parts with `packer`, in wire order.
    pub fn pack(&self, packer: Packer) -> Result<[Vec<u8>; 4], WireError> {
        Ok([
            packer.pack(&self.header)?,
            packer.pack(&self.parent_header)?,
            packer.pack(&self.metadata)?,
            packer.pack(&self.content)?,
        ])
    }
}
