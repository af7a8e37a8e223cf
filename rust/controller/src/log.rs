//! A small stderr logger: the controller runs without Python on its threads.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug = 10,
    Info = 20,
    Warning = 30,
    Error = 40,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

impl Level {
    pub fn from_name(name: &str) -> Option<Level> {
        Some(match name.to_ascii_uppercase().as_str() {
            "DEBUG" | "10" => Level::Debug,
            "INFO" | "20" => Level::Info,
            "WARNING" | "WARN" | "30" => Level::Warning,
            "ERROR" | "CRITICAL" | "40" | "50" => Level::Error,
            _ => return None,
        })
    }

    fn letter(self) -> char {
        match self {
            Level::Debug => 'D',
            Level::Info => 'I',
            Level::Warning => 'W',
            Level::Error => 'E',
        }
    }
}

pub fn set_level(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn enabled(level: Level) -> bool {
    level as u8 >= LEVEL.load(Ordering::Relaxed)
}

pub fn write(level: Level, args: std::fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let now = fp_wire::iso_now();
    let stamp = now.get(..23).unwrap_or(&now);
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "[{} {} ferroparallel.controller] {}",
        level.letter(),
        stamp,
        args
    );
}

macro_rules! log_at {
    ($lvl:expr, $($arg:tt)*) => {
        $crate::log::write($lvl, format_args!($($arg)*))
    };
}
pub(crate) use log_at;
