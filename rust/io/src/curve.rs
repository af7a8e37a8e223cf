//! CurveZMQ: keys and socket settings.
//!
//! Keys travel as 40-character Z85 strings (connection files, configuration); sockets get the
//! 32-byte binary form. libzmq is built with libsodium (the vendored `zmq-sys`), so
//! [`available`] is true in every supported build; it is still checked so that a build
//! without CURVE fails with a clear error instead of running in clear text.

use std::ffi::{c_char, c_int};

extern "C" {
    // Part of libzmq's public API (zmq.h, since 4.2.1) but not re-exported by zmq-sys 0.12;
    // the symbol is in the libzmq that zmq-sys links.
    fn zmq_curve_public(z85_public_key: *mut c_char, z85_secret_key: *const c_char) -> c_int;
}

/// Length of a Z85-encoded CURVE key.
pub const Z85_KEY_LEN: usize = 40;

const Z85_ALPHABET: &[u8] =
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

/// A 32-byte CURVE key (public or secret).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CurveKey(pub [u8; 32]);

impl std::fmt::Debug for CurveKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material: secret keys pass through here too.
        f.write_str("CurveKey(..)")
    }
}

impl CurveKey {
    /// Parse a key: 40 Z85 characters, or the 32 raw bytes.
    pub fn parse(what: &str, value: &[u8]) -> Result<CurveKey, String> {
        if value.len() == 32 {
            let mut k = [0u8; 32];
            k.copy_from_slice(value);
            return Ok(CurveKey(k));
        }
        if value.len() != Z85_KEY_LEN {
            return Err(format!(
                "{what}: a CURVE key is {Z85_KEY_LEN} Z85 characters (or 32 raw bytes), \
                 not {} bytes",
                value.len()
            ));
        }
        if let Some(bad) = value.iter().find(|b| !Z85_ALPHABET.contains(b)) {
            return Err(format!(
                "{what}: not a Z85-encoded CURVE key (invalid character {:?})",
                char::from(*bad)
            ));
        }
        // Checked above: ASCII only, no NUL, right length.
        let text = std::str::from_utf8(value).map_err(|e| format!("{what}: {e}"))?;
        let raw = zmq::z85_decode(text).map_err(|e| format!("{what}: invalid Z85: {e:?}"))?;
        let mut k = [0u8; 32];
        if raw.len() != 32 {
            return Err(format!(
                "{what}: decoded key has {} bytes, not 32",
                raw.len()
            ));
        }
        k.copy_from_slice(&raw);
        Ok(CurveKey(k))
    }

    /// The Z85 form (40 characters).
    pub fn z85(&self) -> String {
        // 32 is a multiple of 4, the only way z85_encode can fail.
        zmq::z85_encode(&self.0).unwrap_or_default()
    }
}

/// True when libzmq was built with CURVE.
pub fn available() -> bool {
    zmq::has("curve") == Some(true)
}

fn require() -> Result<(), String> {
    if available() {
        Ok(())
    } else {
        Err("this build of libzmq has no CURVE support (it was built without libsodium)".into())
    }
}

/// A fresh key pair `(public, secret)`.
pub fn keypair() -> Result<(CurveKey, CurveKey), String> {
    require()?;
    let pair =
        zmq::CurveKeyPair::new().map_err(|e| format!("cannot generate a CURVE key pair: {e}"))?;
    Ok((CurveKey(pair.public_key), CurveKey(pair.secret_key)))
}

/// The public key that belongs to `secret`.
pub fn public_key(secret: &CurveKey) -> Result<CurveKey, String> {
    require()?;
    let secret_z85 = std::ffi::CString::new(secret.z85())
        .map_err(|_| "CURVE secret key: Z85 text with a NUL byte".to_string())?;
    let mut public = [0u8; Z85_KEY_LEN + 1];
    // SAFETY: `public` has room for 40 characters plus the terminating NUL that
    // zmq_curve_public writes; `secret_z85` is a NUL-terminated 40-character Z85 string that
    // outlives the call.
    let rc = unsafe { zmq_curve_public(public.as_mut_ptr().cast::<c_char>(), secret_z85.as_ptr()) };
    if rc != 0 {
        return Err(format!(
            "cannot derive the CURVE public key: {}",
            // SAFETY: zmq_errno only reads libzmq's thread-local error code.
            zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() })
        ));
    }
    CurveKey::parse("derived public key", &public[..Z85_KEY_LEN])
}

/// The CURVE role of one socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Curve {
    /// Accepts only peers that know `public` (binding sockets of the controller).
    Server { public: CurveKey, secret: CurveKey },
    /// Talks to the server whose public key is `server`, with its own key pair.
    Client {
        server: CurveKey,
        public: CurveKey,
        secret: CurveKey,
    },
}

impl Curve {
    /// A server role from the secret key alone (the public key is derived).
    pub fn server(secret: CurveKey) -> Result<Curve, String> {
        Ok(Curve::Server {
            public: public_key(&secret)?,
            secret,
        })
    }

    /// A client role for `server` with a fresh key pair.
    pub fn client(server: CurveKey) -> Result<Curve, String> {
        let (public, secret) = keypair()?;
        Ok(Curve::Client {
            server,
            public,
            secret,
        })
    }

    /// Configure `sock`; must happen before it binds or connects.
    pub fn apply(&self, sock: &zmq::Socket) -> Result<(), String> {
        require()?;
        let err = |what: &str, e: zmq::Error| format!("CURVE {what}: {e}");
        match self {
            Curve::Server { public, secret } => {
                sock.set_curve_server(true).map_err(|e| err("server", e))?;
                sock.set_curve_publickey(&public.0)
                    .map_err(|e| err("public key", e))?;
                sock.set_curve_secretkey(&secret.0)
                    .map_err(|e| err("secret key", e))?;
            }
            Curve::Client {
                server,
                public,
                secret,
            } => {
                sock.set_curve_serverkey(&server.0)
                    .map_err(|e| err("server key", e))?;
                sock.set_curve_publickey(&public.0)
                    .map_err(|e| err("public key", e))?;
                sock.set_curve_secretkey(&secret.0)
                    .map_err(|e| err("secret key", e))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libzmq_has_curve() {
        assert_eq!(zmq::has("curve"), Some(true));
        assert!(available());
    }

    #[test]
    fn keys_round_trip_and_derive() {
        let (public, secret) = keypair().expect("keypair");
        assert_eq!(public.z85().len(), Z85_KEY_LEN);
        assert_eq!(
            CurveKey::parse("k", public.z85().as_bytes()).unwrap(),
            public
        );
        assert_eq!(CurveKey::parse("k", &secret.0).unwrap(), secret);
        assert_eq!(public_key(&secret).unwrap(), public);
        assert_ne!(public, secret);
    }

    #[test]
    fn bad_keys_are_refused() {
        for bad in [
            &b""[..],
            b"short",
            &[b'a'; 39],
            &[0u8; 40],
            &[b'"'; 40],
            &[b'a'; 41],
        ] {
            assert!(CurveKey::parse("k", bad).is_err(), "{bad:?}");
        }
        assert!(format!("{:?}", CurveKey([1; 32])).contains(".."));
    }
}
