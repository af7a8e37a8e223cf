use crate::{json, msgpack, Value, WireError};

/// How the four dict parts are packed: the connection file's `pack` / `unpack` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packer {
    Msgpack,
    /// `json`, and `orjson` (which is JSON on the wire).
    Json,
}

impl Packer {
    /// Parse a packer name as written in a connection file.
    pub fn from_name(name: &str) -> Result<Packer, WireError> {
        match name {
            "msgpack" | "msgpack.packb" | "msgpack.unpackb" => Ok(Packer::Msgpack),
            "json" | "orjson" | "json.dumps" | "json.loads" => Ok(Packer::Json),
            other => Err(WireError::Config(format!(
                "unsupported packer {other:?}: use \"msgpack\" or \"json\" (\"orjson\" is read as json)"
            ))),
        }
    }

    /// The canonical name (`msgpack` or `json`).
    pub fn name(self) -> &'static str {
        match self {
            Packer::Msgpack => "msgpack",
            Packer::Json => "json",
        }
    }

    /// Pack a value.
    pub fn pack(self, value: &Value) -> Result<Vec<u8>, WireError> {
        match self {
            Packer::Msgpack => Ok(msgpack::encode(value)),
            Packer::Json => json::encode(value),
        }
    }

    /// Unpack bytes; `part` names the part in the error.
    pub fn unpack(self, data: &[u8], part: &'static str) -> Result<Value, WireError> {
        match self {
            Packer::Msgpack => msgpack::decode(data),
            Packer::Json => json::decode(data),
        }
        .map_err(|reason| WireError::Unpack { part, reason })
    }
}
