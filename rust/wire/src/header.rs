//! Header creation: ids, timestamps, protocol version.

use crate::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The message protocol version we send (jupyter_client 8.9 speaks 5.4).
pub const PROTOCOL_VERSION: &str = "5.4";

/// A jupyter-style id: 16 random bytes as hex, split 8 + 24 with a dash.
pub fn new_id() -> String {
    let mut raw = [0u8; 16];
    // If the OS random source fails (practically never), fall back to time-derived bytes so an
    // id is still produced; uniqueness then rests on the per-session counter.
    if getrandom::getrandom(&mut raw).is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        raw.copy_from_slice(&nanos.to_le_bytes());
    }
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}", &hex[..8], &hex[8..])
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Format a UNIX time (seconds, microseconds) as ISO-8601 UTC with a `Z` suffix, like
/// `2026-11-26T22:34:58.123456Z`. (Digits written directly: this runs for every message sent,
/// and `format!` took several times longer; years outside 0..=9999 take the general path.)
pub fn iso_from_unix(secs: i64, micros: u32) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, (sod % 3600) / 60, sod % 60);
    if !(0..=9999).contains(&y) || micros > 999_999 {
        return format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{micros:06}Z");
    }
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    fn put(out: &mut [u8], mut v: u64) {
        for slot in out.iter_mut().rev() {
            *slot = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    put(&mut out[0..4], y as u64);
    put(&mut out[5..7], u64::from(m));
    put(&mut out[8..10], u64::from(d));
    put(&mut out[11..13], hh as u64);
    put(&mut out[14..16], mm as u64);
    put(&mut out[17..19], ss as u64);
    put(&mut out[20..26], u64::from(micros));
    // only ASCII digits and separators were written
    String::from_utf8(out.to_vec()).expect("ASCII")
}

/// The current time in ISO-8601 UTC.
pub fn iso_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    iso_from_unix(now.as_secs() as i64, now.subsec_micros())
}

/// Creates headers for one session: `msg_id` = `<session>_<pid>_<counter>`.
#[derive(Debug)]
pub struct HeaderFactory {
    pub session: String,
    pub username: String,
    /// `<session>_<pid>_`, what every msg_id starts with.
    id_prefix: String,
    counter: AtomicU64,
}

impl HeaderFactory {
    pub fn new(session: String, username: String) -> Self {
        let id_prefix = format!("{}_{}_", session, std::process::id());
        HeaderFactory {
            session,
            username,
            id_prefix,
            counter: AtomicU64::new(0),
        }
    }

    /// A fresh msg_id.
    pub fn next_msg_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n;
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        let mut id = String::with_capacity(self.id_prefix.len() + digits.len() - i);
        id.push_str(&self.id_prefix);
        // only ASCII digits
        id.push_str(std::str::from_utf8(&digits[i..]).expect("ASCII"));
        id
    }

    /// A new header map for `msg_type`.
    pub fn header(&self, msg_type: &str) -> Value {
        self.header_with_id(msg_type, self.next_msg_id())
    }

    /// A new header with a caller-chosen msg_id.
    pub fn header_with_id(&self, msg_type: &str, msg_id: String) -> Value {
        Value::map([
            ("msg_id", Value::Str(msg_id)),
            ("msg_type", Value::from(msg_type)),
            ("username", Value::from(self.username.as_str())),
            ("session", Value::from(self.session.as_str())),
            ("date", Value::Str(iso_now())),
            ("version", Value::from(PROTOCOL_VERSION)),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates() {
        assert_eq!(iso_from_unix(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(iso_from_unix(951_782_400, 5), "2000-02-29T00:00:00.000005Z");
        assert_eq!(
            iso_from_unix(1_795_733_298, 123_456),
            "2026-11-26T22:48:18.123456Z"
        );
    }

    /// The direct formatting writes what `format!` would, over a range of dates, times and
    /// microseconds (and falls back to it outside years 0..=9999).
    #[test]
    fn iso_dates_match_format() {
        fn reference(secs: i64, micros: u32) -> String {
            let days = secs.div_euclid(86_400);
            let sod = secs.rem_euclid(86_400);
            let (y, m, d) = civil_from_days(days);
            format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
                sod / 3600,
                (sod % 3600) / 60,
                sod % 60
            )
        }
        let mut secs: i64 = -70_000_000_000;
        let mut micros: u32 = 0;
        while secs < 260_000_000_000 {
            assert_eq!(
                iso_from_unix(secs, micros),
                reference(secs, micros),
                "{secs} {micros}"
            );
            secs += 86_399 * 37 + 4_321;
            micros = (micros + 123_457) % 1_000_000;
        }
        for (s, us) in [
            (0, 999_999),
            (-1, 0),
            (253_402_300_799, 999_999),
            (i64::MAX / 2, 1),
        ] {
            assert_eq!(iso_from_unix(s, us), reference(s, us));
        }
    }

    #[test]
    fn msg_ids_count_up() {
        let f = HeaderFactory::new("s".into(), "u".into());
        let pid = std::process::id();
        for n in 0..1_005u64 {
            assert_eq!(f.next_msg_id(), format!("s_{pid}_{n}"));
        }
        f.counter.store(u64::MAX, Ordering::Relaxed);
        assert_eq!(f.next_msg_id(), format!("s_{pid}_{}", u64::MAX));
    }

    #[test]
    fn ids_and_headers() {
        let id = new_id();
        assert_eq!(id.len(), 33);
        assert_eq!(&id[8..9], "-");
        assert_ne!(new_id(), id);
        let f = HeaderFactory::new(id.clone(), "me".into());
        let h = f.header("apply_request");
        assert_eq!(
            h.get("msg_type").and_then(|v| v.as_str()),
            Some("apply_request")
        );
        assert_eq!(h.get("version").and_then(|v| v.as_str()), Some("5.4"));
        assert!(h
            .get("msg_id")
            .and_then(|v| v.as_str())
            .unwrap()
            .ends_with("_0"));
        assert!(f.next_msg_id().ends_with("_1"));
    }
}
