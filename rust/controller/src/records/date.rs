//! ISO-8601 timestamps as microseconds since the UNIX epoch (UTC).
//!
//! Records keep their dates as integers; queries and replies use ISO strings. Naive times (no
//! offset) are taken as UTC, like every timestamp the cluster writes.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since 1970-01-01T00:00:00Z.
pub type Micros = i64;

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn digits(b: &[u8], at: usize, n: usize) -> Option<i64> {
    let s = b.get(at..at + n)?;
    let mut v = 0i64;
    for c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as i64;
    }
    Some(v)
}

/// Parse `YYYY-MM-DD[(T| )HH:MM[:SS[.f{1,9}]]][Z|±HH[:]MM]`; `None` if it is not such a date.
pub fn parse(s: &str) -> Option<Micros> {
    let b = s.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, mo, d) = (digits(b, 0, 4)?, digits(b, 5, 2)?, digits(b, 8, 2)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let mut micros = days_from_civil(y, mo as u32, d as u32) * 86_400_000_000;
    let mut i = 10;
    if i < b.len() && (b[i] == b'T' || b[i] == b't' || b[i] == b' ') {
        let h = digits(b, i + 1, 2)?;
        if b.get(i + 3) != Some(&b':') {
            return None;
        }
        let mi = digits(b, i + 4, 2)?;
        i += 6;
        let mut sec = 0;
        let mut frac = 0i64;
        if b.get(i) == Some(&b':') {
            sec = digits(b, i + 1, 2)?;
            i += 3;
            if b.get(i) == Some(&b'.') || b.get(i) == Some(&b',') {
                i += 1;
                let start = i;
                let mut scale = 100_000i64;
                while i < b.len() && b[i].is_ascii_digit() {
                    frac += (b[i] - b'0') as i64 * scale;
                    scale /= 10;
                    i += 1;
                }
                if i == start || i - start > 9 {
                    return None;
                }
            }
        }
        if h > 23 || mi > 59 || sec > 60 {
            return None;
        }
        micros += ((h * 60 + mi) * 60 + sec) * 1_000_000 + frac;
    }
    match b.get(i) {
        None => {}
        Some(b'Z') | Some(b'z') if i + 1 == b.len() => {}
        Some(&sign @ (b'+' | b'-')) => {
            let oh = digits(b, i + 1, 2)?;
            let rest = &b[i + 3..];
            let om = match rest {
                [] => 0,
                [b':', ..] if rest.len() == 3 => digits(rest, 1, 2)?,
                _ if rest.len() == 2 => digits(rest, 0, 2)?,
                _ => return None,
            };
            let off = (oh * 60 + om) * 60_000_000;
            micros += if sign == b'+' { -off } else { off };
        }
        _ => return None,
    }
    Some(micros)
}

/// Format as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (fixed width, so strings sort like times).
pub fn format(t: Micros) -> String {
    fp_wire::iso_from_unix(t.div_euclid(1_000_000), t.rem_euclid(1_000_000) as u32)
}

/// The current time.
pub fn now() -> Micros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_forms() {
        let t = parse("2026-11-26T22:48:18.123456Z").unwrap();
        assert_eq!(format(t), "2026-11-26T22:48:18.123456Z");
        assert_eq!(parse("1970-01-01"), Some(0));
        assert_eq!(parse("1970-01-01T00:00:01"), Some(1_000_000));
        assert_eq!(parse("1970-01-01 00:00:01.5"), Some(1_500_000));
        assert_eq!(parse("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse("1970-01-01T00:00:00-0130"), Some(5_400_000_000));
        assert_eq!(
            parse("2000-02-29T00:00:00.000005Z"),
            Some(951_782_400_000_005)
        );
        assert_eq!(format(-1), "1969-12-31T23:59:59.999999Z");
        for bad in [
            "",
            "hello",
            "2026-13-01",
            "2026-11-26T2",
            "2026-11-26Tab:cd",
            "2026-11-26Zx",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
