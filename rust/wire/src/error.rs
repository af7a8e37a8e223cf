use std::fmt;

/// Everything that can be wrong with a message received from the network or built from user data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// No `<IDS|MSG>` delimiter frame.
    NoDelimiter,
    /// Fewer than the 5 frames (signature + 4 parts) after the delimiter.
    TooFewFrames { got: usize },
    /// Auth is configured but the signature frame is empty.
    Unsigned,
    /// The signature does not match the message.
    InvalidSignature,
    /// The signature was already seen (replayed message).
    DuplicateSignature,
    /// A packed part could not be unpacked.
    Unpack { part: &'static str, reason: String },
    /// A value could not be packed (e.g. NaN or a non-string key with the json packer).
    Pack { reason: String },
    /// A frame, part or whole message is larger than the configured limit.
    Oversized {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    /// A structurally valid message lacks a required field or has one of the wrong type.
    BadField { field: &'static str, reason: String },
    /// A configuration value (packer name, signature scheme) is not supported.
    Config(String),
}

impl WireError {
    /// A short, stable name for the kind of error (used to pick the Python exception class).
    pub fn kind(&self) -> &'static str {
        match self {
            WireError::NoDelimiter
            | WireError::TooFewFrames { .. }
            | WireError::BadField { .. } => "MalformedMessage",
            WireError::Unsigned => "UnsignedMessage",
            WireError::InvalidSignature => "InvalidSignature",
            WireError::DuplicateSignature => "DuplicateSignature",
            WireError::Unpack { .. } | WireError::Pack { .. } => "UnpackError",
            WireError::Oversized { .. } => "MessageTooLarge",
            WireError::Config(_) => "WireConfigError",
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::NoDelimiter => write!(f, "no <IDS|MSG> delimiter frame in message"),
            WireError::TooFewFrames { got } => write!(
                f,
                "message has {got} frames after the delimiter, at least 5 are required \
                 (signature, header, parent_header, metadata, content)"
            ),
            WireError::Unsigned => write!(f, "unsigned message: a signature is required"),
            WireError::InvalidSignature => write!(f, "invalid message signature"),
            WireError::DuplicateSignature => {
                write!(f, "duplicate signature: message was replayed")
            }
            WireError::Unpack { part, reason } => write!(f, "cannot unpack {part}: {reason}"),
            WireError::Pack { reason } => write!(f, "cannot pack message part: {reason}"),
            WireError::Oversized { what, size, limit } => {
                write!(
                    f,
                    "{what} of {size} bytes exceeds the limit of {limit} bytes"
                )
            }
            WireError::BadField { field, reason } => write!(f, "bad field {field:?}: {reason}"),
            WireError::Config(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for WireError {}
