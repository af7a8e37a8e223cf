use crate::{json, msgpack, Value, WireError};

/// One field of a packed dict (see [`Packer::fields`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Field<'a> {
    /// One whole, checked msgpack value, in place.
    Packed(&'a [u8]),
    /// An unpacked value (the JSON packer).
    Value(Value),
}

impl Field<'_> {
    /// The string it holds, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Field::Packed(raw) => msgpack::str_at(raw),
            Field::Value(v) => v.as_str(),
        }
    }

    /// The boolean it holds, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Field::Packed([0xc2]) => Some(false),
            Field::Packed([0xc3]) => Some(true),
            Field::Packed(_) => None,
            Field::Value(Value::Bool(b)) => Some(*b),
            Field::Value(_) => None,
        }
    }

    /// The value it holds.
    pub fn into_value(self) -> Value {
        match self {
            // (checked when it was found: decoding cannot fail)
            Field::Packed(raw) => msgpack::decode(raw).unwrap_or(Value::Nil),
            Field::Value(v) => v,
        }
    }
}

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

    /// Check that `data` unpacks, without keeping what it holds (msgpack: without building it).
    pub fn validate(self, data: &[u8], part: &'static str) -> Result<(), WireError> {
        match self {
            Packer::Msgpack => msgpack::validate(data),
            Packer::Json => json::decode(data).map(drop),
        }
        .map_err(|reason| WireError::Unpack { part, reason })
    }

    /// The values of `keys` in the dict `data` holds (see [`Value::get`]), checking all of
    /// `data` as [`Packer::unpack`] does. With msgpack nothing else is built: the fields are
    /// read from `data` in place.
    pub fn fields<'a, const N: usize>(
        self,
        data: &'a [u8],
        part: &'static str,
        keys: [&str; N],
    ) -> Result<[Option<Field<'a>>; N], WireError> {
        let err = |reason| WireError::Unpack { part, reason };
        match self {
            Packer::Msgpack => Ok(msgpack::lookup(data, keys)
                .map_err(err)?
                .map(|raw| raw.map(Field::Packed))),
            Packer::Json => {
                let mut value = json::decode(data).map_err(err)?;
                Ok(keys.map(|k| {
                    value
                        .get_mut(k)
                        .map(|v| Field::Value(std::mem::replace(v, Value::Nil)))
                }))
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_the_same_under_both_packers() {
        let v = Value::map([
            ("status", Value::from("ok")),
            ("dependencies_met", Value::Bool(false)),
            ("after", Value::Array(vec![Value::from("a")])),
        ]);
        for packer in [Packer::Msgpack, Packer::Json] {
            let data = packer.pack(&v).expect("pack");
            packer.validate(&data, "metadata").expect("valid");
            let [status, met, after, none] = packer
                .fields(
                    &data,
                    "metadata",
                    ["status", "dependencies_met", "after", "x"],
                )
                .expect("fields");
            assert_eq!(status.as_ref().and_then(Field::as_str), Some("ok"));
            assert_eq!(met.as_ref().and_then(Field::as_bool), Some(false));
            assert_eq!(met.as_ref().and_then(Field::as_str), None);
            assert_eq!(after.map(Field::into_value), v.get("after").cloned());
            assert!(none.is_none());
            let bad = &data[..data.len() - 1];
            assert!(packer.validate(bad, "metadata").is_err());
            assert!(packer.fields(bad, "metadata", ["status"]).is_err());
        }
    }
}
