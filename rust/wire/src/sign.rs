//! HMAC signing and verification with a bounded history of seen digests.

use crate::{Value, WireError};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

type HmacSha256 = Hmac<Sha256>;

/// Default number of digests remembered to reject replays (as jupyter_client).
pub const DEFAULT_HISTORY_SIZE: usize = 65536;

/// Metadata key holding the hex MAC of a message's buffers (see [`Auth::buffers_digest`]).
pub const BUFFERS_DIGEST_KEY: &str = "buffers_mac";

/// Buffers at least this long are hashed on several threads.
const PARALLEL_HASH_MIN: usize = 4 << 20;

/// Context string deriving the buffers MAC key from the session key (BLAKE3 `derive_key`):
/// the buffers MAC and the message signature never share a key.
const BUFFERS_CONTEXT: &str = "ferroparallel 2026-11 buffers MAC v1";

/// Domain tag of [`StreamDigest`]: the digest of a data stream message's frames is never a
/// buffers digest nor a stream MAC (all three are keyed by the buffers MAC key). (v2 hashed
/// the frames' bytes into it with keyed BLAKE3; v3 hashes their GMAC tags.)
const STREAM_DIGEST_DOMAIN: &[u8] = b"ferroparallel data stream frames v3\0";

/// Domain tag of [`StreamKey::mac`] (v1 hashed the frames themselves after the request's
/// msg_id; v2 had no nonce).
const STREAM_MAC_DOMAIN: &[u8] = b"ferroparallel data stream v3\0";

/// Context string deriving the data stream's GMAC key from the buffers MAC key (BLAKE3
/// `derive_key`): no other use of that key is AES.
const STREAM_GMAC_CONTEXT: &str = "ferroparallel 2026-11 data stream GMAC key v3";

/// The random nonce prefix of one loan's digest: frame `i` is authenticated with the GMAC
/// nonce `prefix || u32 BE i`. It is not secret and travels with the MAC.
pub type StreamNonce = [u8; 8];

/// The GMAC key could not authenticate a frame (AES-GCM's limit on associated data, 2^61
/// bytes: never reached in memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GmacFailed;

/// Keyed digest of the frames of one data stream message under one nonce prefix, independent
/// of the request it answers: the frame count (u64 big-endian), then for each frame its length
/// (u64 big-endian) and its AES-256-GMAC tag (nonce: the prefix and the frame's index, the
/// frame's bytes as associated data), all under keyed BLAKE3. A lender computes it once per
/// loan however many peers fetch it; each receiver computes it over the bytes it received.
/// The tags never leave it.
#[derive(Debug, Clone)]
pub struct StreamDigest {
    hasher: blake3::Hasher,
    gmac: Arc<LessSafeKey>,
    nonce: StreamNonce,
    index: u32,
}

impl StreamDigest {
    /// Add the next frame, whole (GMAC is one-shot: 18-19 GB/s on AES-NI/VPCLMULQDQ, about
    /// 4x keyed BLAKE3 on one core). At most 2^32 frames (a message's count is a u32).
    pub fn frame(&mut self, bytes: &[u8]) -> Result<(), GmacFailed> {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&self.nonce);
        nonce[8..].copy_from_slice(&self.index.to_be_bytes());
        self.index = self.index.wrapping_add(1);
        let mut empty = [0u8; 0];
        let tag = self
            .gmac
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(bytes),
                &mut empty,
            )
            .map_err(|_| GmacFailed)?;
        self.hasher.update(&(bytes.len() as u64).to_be_bytes());
        self.hasher.update(tag.as_ref());
        Ok(())
    }

    /// The 32-byte digest (secret: it never travels, only [`StreamKey::mac`] of it does).
    pub fn finish(&self) -> [u8; 32] {
        *self.hasher.finalize().as_bytes()
    }
}

/// The key of the data stream's MAC (the buffers MAC key; see [`Auth::stream_key`]), and the
/// GMAC key derived from it.
#[derive(Clone)]
pub struct StreamKey {
    key: [u8; 32],
    gmac: Arc<LessSafeKey>,
}

impl PartialEq for StreamKey {
    fn eq(&self, other: &StreamKey) -> bool {
        // (the GMAC key is derived from `key`)
        self.key == other.key
    }
}

impl Eq for StreamKey {}

impl std::fmt::Debug for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamKey(..)")
    }
}

impl StreamKey {
    fn new(key: [u8; 32]) -> StreamKey {
        let gmac_key = blake3::derive_key(STREAM_GMAC_CONTEXT, &key);
        let unbound =
            UnboundKey::new(&AES_256_GCM, &gmac_key).expect("AES-256-GCM takes a 32-byte key");
        StreamKey {
            key,
            gmac: Arc::new(LessSafeKey::new(unbound)),
        }
    }

    /// A fresh random nonce prefix for one loan (from the OS's CSPRNG).
    pub fn fresh_nonce() -> Result<StreamNonce, getrandom::Error> {
        let mut nonce = [0u8; 8];
        getrandom::getrandom(&mut nonce)?;
        Ok(nonce)
    }

    /// A digest of a message of `count` frames under the nonce prefix `nonce`.
    pub fn digest(&self, nonce: &StreamNonce, count: u64) -> StreamDigest {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        hasher.update(STREAM_DIGEST_DOMAIN);
        hasher.update(&count.to_be_bytes());
        StreamDigest {
            hasher,
            gmac: Arc::clone(&self.gmac),
            nonce: *nonce,
            index: 0,
        }
    }

    /// The MAC of a message whose frames have `digest` under `nonce`, answering `context`
    /// (the msg_id of the fetch request, so a recorded reply cannot answer another request):
    /// keyed BLAKE3 over a domain tag, the context's length and bytes, the nonce and the
    /// digest. 48 bytes hashed per fetch instead of the frames.
    pub fn mac(&self, context: &[u8], nonce: &StreamNonce, digest: &[u8; 32]) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        hasher.update(STREAM_MAC_DOMAIN);
        hasher.update(&(context.len() as u64).to_be_bytes());
        hasher.update(context);
        hasher.update(nonce);
        hasher.update(digest);
        *hasher.finalize().as_bytes()
    }

    /// Whether `given` is the MAC of `digest` under `nonce` for `context` (constant-time
    /// comparison).
    pub fn matches(
        &self,
        context: &[u8],
        nonce: &StreamNonce,
        digest: &[u8; 32],
        given: &[u8; 32],
    ) -> bool {
        blake3::Hash::from(self.mac(context, nonce, digest)) == blake3::Hash::from(*given)
    }
}

/// A bounded set of seen signatures. When full, the oldest 10% are forgotten.
#[derive(Debug, Clone)]
pub struct DigestHistory {
    capacity: usize,
    /// (foldhash, not SipHash: a digest enters only once its HMAC is verified, and HMAC
    /// outputs are uniform: nobody without the key can aim at a bucket)
    seen: HashSet<[u8; 32], foldhash::fast::RandomState>,
    order: VecDeque<[u8; 32]>,
}

impl DigestHistory {
    pub fn new(capacity: usize) -> Self {
        DigestHistory {
            capacity: capacity.max(1),
            seen: HashSet::default(),
            order: VecDeque::new(),
        }
    }

    /// Record a digest; returns false if it was already present.
    pub fn insert(&mut self, digest: [u8; 32]) -> bool {
        if !self.seen.insert(digest) {
            return false;
        }
        self.order.push_back(digest);
        if self.order.len() > self.capacity {
            let drop = (self.capacity / 10).max(1);
            for _ in 0..drop {
                if let Some(old) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
        true
    }

    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        self.seen.contains(digest)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Message authentication: an HMAC-SHA256 key (or none) and the replay history.
#[derive(Debug, Clone)]
pub struct Auth {
    mac: Option<HmacSha256>,
    /// Key of the buffers MAC (keyed BLAKE3), derived from the session key.
    buffers_key: Option<[u8; 32]>,
    history: DigestHistory,
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn decode_hex32(sig: &[u8]) -> Option<[u8; 32]> {
    if sig.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in sig.chunks_exact(2).enumerate() {
        out[i] = hex_value(pair[0])? << 4 | hex_value(pair[1])?;
    }
    Some(out)
}

fn encode_hex(bytes: &[u8]) -> Vec<u8> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize]);
        out.push(DIGITS[(b & 0x0f) as usize]);
    }
    out
}

impl Auth {
    /// `key` empty means no signing at all (signature frame `b""`, nothing checked).
    /// Only the `hmac-sha256` scheme is supported.
    pub fn new(key: &[u8], signature_scheme: &str) -> Result<Auth, WireError> {
        Self::with_history(key, signature_scheme, DEFAULT_HISTORY_SIZE)
    }

    pub fn with_history(key: &[u8], scheme: &str, history: usize) -> Result<Auth, WireError> {
        if scheme != "hmac-sha256" {
            return Err(WireError::Config(format!(
                "unsupported signature_scheme {scheme:?}: only \"hmac-sha256\" is supported"
            )));
        }
        let mac = if key.is_empty() {
            None
        } else {
            Some(HmacSha256::new_from_slice(key).map_err(|e| WireError::Config(e.to_string()))?)
        };
        let buffers_key = (!key.is_empty()).then(|| blake3::derive_key(BUFFERS_CONTEXT, key));
        Ok(Auth {
            mac,
            buffers_key,
            history: DigestHistory::new(history),
        })
    }

    /// True when a key is configured.
    pub fn is_signing(&self) -> bool {
        self.mac.is_some()
    }

    fn digest(&self, parts: &[&[u8]; 4]) -> Option<[u8; 32]> {
        let mut mac = self.mac.clone()?;
        for part in parts {
            mac.update(part);
        }
        Some(mac.finalize().into_bytes().into())
    }

    /// The lowercase hex signature of the four packed parts (empty without a key).
    pub fn sign(&self, parts: &[&[u8]; 4]) -> Vec<u8> {
        match self.digest(parts) {
            Some(d) => encode_hex(&d),
            None => Vec::new(),
        }
    }

    /// Check a signature in constant time. With `record`, the digest enters the replay history
    /// and a digest already there is rejected as a replay.
    pub fn verify(
        &mut self,
        signature: &[u8],
        parts: &[&[u8]; 4],
        record: bool,
    ) -> Result<(), WireError> {
        let Some(mac) = self.mac.clone() else {
            return Ok(());
        };
        if signature.is_empty() {
            return Err(WireError::Unsigned);
        }
        let given = decode_hex32(signature).ok_or(WireError::InvalidSignature)?;
        let mut mac = mac;
        for part in parts {
            mac.update(part);
        }
        mac.verify_slice(&given)
            .map_err(|_| WireError::InvalidSignature)?;
        if record && !self.history.insert(given) {
            return Err(WireError::DuplicateSignature);
        }
        if !record && self.history.contains(&given) {
            return Err(WireError::DuplicateSignature);
        }
        Ok(())
    }

    pub fn history(&self) -> &DigestHistory {
        &self.history
    }

    /// Enter an already verified signature into the replay history; a signature already there
    /// is rejected as a replay. Used to record a message only once all of it has been checked.
    pub fn record(&mut self, signature: &[u8]) -> Result<(), WireError> {
        if self.mac.is_none() {
            return Ok(());
        }
        let given = decode_hex32(signature).ok_or(WireError::InvalidSignature)?;
        if self.history.insert(given) {
            Ok(())
        } else {
            Err(WireError::DuplicateSignature)
        }
    }

    /// The key of the direct data stream's MAC (`fp_io::stream`), `None` without a key: the
    /// buffers MAC key, under its own domain tags ([`StreamDigest`], [`StreamKey::mac`]).
    pub fn stream_key(&self) -> Option<StreamKey> {
        Some(StreamKey::new(self.buffers_key?))
    }

    fn buffers_mac<'a, I>(&self, buffers: I) -> Option<blake3::Hash>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let mut mac = blake3::Hasher::new_keyed(self.buffers_key.as_ref()?);
        for b in buffers {
            mac.update(&(b.len() as u64).to_be_bytes());
            if b.len() >= PARALLEL_HASH_MIN {
                // same result as `update`, on every core (a large array is hashed by the
                // sender and the receiver, each with the transfer waiting for it)
                mac.update_rayon(b);
            } else {
                mac.update(b);
            }
        }
        Some(mac.finalize())
    }

    /// The lowercase hex MAC of the buffers (frames after content), `None` without a key:
    /// keyed BLAKE3 (several times faster than HMAC-SHA256 on large arrays) under a key
    /// derived from the session key. Input: for each buffer its length (u64 big-endian) and
    /// bytes, so neither the split between buffers nor their number can be changed unnoticed.
    pub fn buffers_digest<'a, I>(&self, buffers: I) -> Option<String>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        Some(self.buffers_mac(buffers)?.to_hex().to_string())
    }

    /// Check buffers against the hex MAC found in signed metadata (constant-time comparison).
    /// Without a key nothing is checked.
    pub fn verify_buffers<'a, I>(&self, expected: &[u8], buffers: I) -> Result<(), WireError>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let Some(mac) = self.buffers_mac(buffers) else {
            return Ok(());
        };
        let given = decode_hex32(expected).ok_or(WireError::InvalidSignature)?;
        // blake3::Hash compares in constant time
        if mac == blake3::Hash::from(given) {
            Ok(())
        } else {
            Err(WireError::InvalidSignature)
        }
    }

    /// Check the buffers of a message whose signature was verified, given its unpacked
    /// metadata: when the metadata carries [`BUFFERS_DIGEST_KEY`], the buffers must match it
    /// (peers that do not send it, like ipyparallel, are accepted as they are).
    pub fn check_buffers<'a, I>(&self, metadata: &Value, buffers: I) -> Result<(), WireError>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        if self.mac.is_none() {
            return Ok(());
        }
        match metadata.get(BUFFERS_DIGEST_KEY) {
            None => Ok(()),
            Some(Value::Str(hex)) => self.verify_buffers(hex.as_bytes(), buffers),
            Some(_) => Err(WireError::InvalidSignature),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // HMAC-SHA256(key="key", "The quick brown fox jumps over the lazy dog")
        let auth = Auth::new(b"key", "hmac-sha256").unwrap();
        let sig = auth.sign(&[
            b"The quick brown ",
            b"fox jumps ",
            b"over the lazy",
            b" dog",
        ]);
        assert_eq!(
            sig,
            b"f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8".to_vec()
        );
    }

    #[test]
    fn verify_rejects_tamper_replay_and_unsigned() {
        let mut auth = Auth::new(b"secret", "hmac-sha256").unwrap();
        let parts: [&[u8]; 4] = [b"h", b"p", b"m", b"c"];
        let sig = auth.sign(&parts);
        assert_eq!(auth.verify(b"", &parts, true), Err(WireError::Unsigned));
        assert_eq!(
            auth.verify(b"zz", &parts, true),
            Err(WireError::InvalidSignature)
        );
        let tampered: [&[u8]; 4] = [b"h", b"p", b"m", b"C"];
        assert_eq!(
            auth.verify(&sig, &tampered, true),
            Err(WireError::InvalidSignature)
        );
        assert_eq!(auth.verify(&sig, &parts, false), Ok(()));
        assert_eq!(auth.verify(&sig, &parts, true), Ok(()));
        assert_eq!(
            auth.verify(&sig, &parts, true),
            Err(WireError::DuplicateSignature)
        );
        let upper = String::from_utf8(sig).unwrap().to_uppercase();
        assert_eq!(
            auth.verify(upper.as_bytes(), &parts, true),
            Err(WireError::InvalidSignature)
        );
    }

    #[test]
    fn no_key_means_no_checks() {
        let mut auth = Auth::new(b"", "hmac-sha256").unwrap();
        assert!(auth.sign(&[b"a", b"b", b"c", b"d"]).is_empty());
        assert!(auth.verify(b"", &[b"a", b"b", b"c", b"d"], true).is_ok());
        assert!(Auth::new(b"k", "hmac-md5").is_err());
    }

    #[test]
    fn large_buffers_hash_in_parallel_to_the_same_digest() {
        let auth = Auth::new(b"secret", "hmac-sha256").unwrap();
        let big: Vec<u8> = (0..PARALLEL_HASH_MIN + 12_345)
            .map(|i| (i % 251) as u8)
            .collect();
        let bufs: [&[u8]; 3] = [b"head", &big, b"tail"];
        let mut serial = blake3::Hasher::new_keyed(auth.buffers_key.as_ref().unwrap());
        for b in bufs {
            serial.update(&(b.len() as u64).to_be_bytes());
            serial.update(b);
        }
        let d = auth.buffers_digest(bufs).unwrap();
        assert_eq!(d, serial.finalize().to_hex().to_string());
        assert!(auth.verify_buffers(d.as_bytes(), bufs).is_ok());
    }

    #[test]
    fn buffers_digest_covers_bytes_split_and_count() {
        let mut auth = Auth::new(b"secret", "hmac-sha256").unwrap();
        let bufs: [&[u8]; 2] = [b"abc", b"def"];
        let d = auth.buffers_digest(bufs).unwrap();
        assert_eq!(d.len(), 64);
        assert!(auth.verify_buffers(d.as_bytes(), bufs).is_ok());
        for other in [
            vec![&b"abc"[..], &b"deF"[..]],
            vec![&b"ab"[..], &b"cdef"[..]],
            vec![&b"abcdef"[..]],
            vec![&b"abc"[..], &b"def"[..], &b""[..]],
            vec![],
        ] {
            assert_eq!(
                auth.verify_buffers(d.as_bytes(), other),
                Err(WireError::InvalidSignature)
            );
        }
        assert_eq!(
            auth.verify_buffers(b"not hex", bufs),
            Err(WireError::InvalidSignature)
        );
        // A buffers digest is never a valid message signature.
        let parts: [&[u8]; 4] = [b"", b"", b"", b""];
        assert!(auth.verify(d.as_bytes(), &parts, false).is_err());
        let md = Value::map([(BUFFERS_DIGEST_KEY, Value::Str(d.clone()))]);
        assert!(auth.check_buffers(&md, bufs).is_ok());
        assert!(auth.check_buffers(&Value::empty_map(), [&b"x"[..]]).is_ok());
        let bad = Value::map([(BUFFERS_DIGEST_KEY, Value::Int(1))]);
        assert!(auth.check_buffers(&bad, bufs).is_err());
        let unkeyed = Auth::new(b"", "hmac-sha256").unwrap();
        assert!(unkeyed.buffers_digest(bufs).is_none());
        assert!(unkeyed.check_buffers(&bad, bufs).is_ok());
        // record() only enters verified signatures once.
        let sig = auth.sign(&parts);
        assert_eq!(auth.record(&sig), Ok(()));
        assert_eq!(auth.record(&sig), Err(WireError::DuplicateSignature));
        assert_eq!(auth.record(b"zz"), Err(WireError::InvalidSignature));
    }

    #[test]
    fn stream_macs_bind_frames_nonce_request_and_key_and_stand_apart() {
        let auth = Auth::new(b"secret", "hmac-sha256").unwrap();
        let k = auth.stream_key().unwrap();
        let n = StreamKey::fresh_nonce().unwrap();
        let digest_of = |k: &StreamKey, n: &StreamNonce, frames: &[&[u8]]| {
            let mut d = k.digest(n, frames.len() as u64);
            for f in frames {
                d.frame(f).unwrap();
            }
            d.finish()
        };
        let d = digest_of(&k, &n, &[b"abc", b"def"]);
        assert_eq!(digest_of(&k, &n, &[b"abc", b"def"]), d);
        // an altered byte, bytes moved between frames, frames merged, an empty frame added,
        // frames swapped
        for other in [
            &[&b"abc"[..], &b"deF"[..]][..],
            &[&b"ab"[..], &b"cdef"[..]],
            &[&b"abcdef"[..]],
            &[&b"abc"[..], &b"def"[..], &b""[..]],
            &[&b"def"[..], &b"abc"[..]],
        ] {
            assert_ne!(digest_of(&k, &n, other), d);
        }
        // another nonce, another key
        let mut n2 = n;
        n2[7] ^= 1;
        assert_ne!(digest_of(&k, &n2, &[b"abc", b"def"]), d);
        let other = Auth::new(b"other", "hmac-sha256")
            .unwrap()
            .stream_key()
            .unwrap();
        assert_ne!(digest_of(&other, &n, &[b"abc", b"def"]), d);
        let mac = k.mac(b"req-1", &n, &d);
        assert!(k.matches(b"req-1", &n, &d, &mac));
        // a replayed reply for another request, another nonce, other bytes, another key
        assert!(!k.matches(b"req-2", &n, &d, &mac));
        assert!(!k.matches(b"req-1", &n2, &d, &mac));
        let altered = digest_of(&k, &n, &[b"abc", b"deF"]);
        assert!(!k.matches(b"req-1", &n, &altered, &mac));
        assert!(!other.matches(b"req-1", &n, &d, &mac));
        assert_ne!(mac, d);
        // large frames (the GMAC's associated data spans many blocks); one bit flipped
        let mut big: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 251) as u8).collect();
        let big_d = digest_of(&k, &n, &[&big]);
        big[2 << 20] ^= 0x80;
        assert_ne!(digest_of(&k, &n, &[&big]), big_d);
        // fresh nonces differ
        assert_ne!(StreamKey::fresh_nonce().unwrap(), n);
        // a digest is neither the buffers digest of the same buffers nor a MAC
        let buffers = auth.buffers_digest([&b"abc"[..], &b"def"[..]]).unwrap();
        assert_ne!(buffers, blake3::Hash::from(d).to_hex().to_string());
        assert!(Auth::new(b"", "hmac-sha256")
            .unwrap()
            .stream_key()
            .is_none());
    }

    #[test]
    fn history_is_bounded() {
        let mut h = DigestHistory::new(100);
        for i in 0..1000u32 {
            let mut d = [0u8; 32];
            d[..4].copy_from_slice(&i.to_be_bytes());
            assert!(h.insert(d));
        }
        assert!(h.len() <= 100);
    }
}
