//! JSON codec for [`Value`] with the conventions of a jupyter_client Session: bytes become base64
//! text, scalar map keys become strings, NaN and infinities are refused.

use crate::{Value, WireError};
use base64::Engine as _;
use serde_json::{Map, Number, Value as Json};

pub fn encode(value: &Value) -> Result<Vec<u8>, WireError> {
    let json = to_json(value)?;
    serde_json::to_vec(&json).map_err(|e| WireError::Unpack {
        part: "json",
        reason: e.to_string(),
    })
}

fn key_string(key: &Value) -> Result<String, WireError> {
    Ok(match key {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Nil => "null".into(),
        Value::Float(f) => f.to_string(),
        other => {
            return Err(WireError::Pack {
                reason: format!("map key {other:?} cannot be a JSON object key"),
            })
        }
    })
}

fn to_json(value: &Value) -> Result<Json, WireError> {
    Ok(match value {
        Value::Nil => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::Number((*i).into()),
        Value::UInt(u) => Json::Number((*u).into()),
        Value::Float(f) => Json::Number(Number::from_f64(*f).ok_or_else(|| WireError::Pack {
            reason: format!("{f} is not allowed in JSON"),
        })?),
        Value::Str(s) => Json::String(s.clone()),
        Value::Bin(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect::<Result<_, _>>()?),
        Value::Map(items) => {
            let mut map = Map::with_capacity(items.len());
            for (k, v) in items {
                map.insert(key_string(k)?, to_json(v)?);
            }
            Json::Object(map)
        }
    })
}

pub fn decode(data: &[u8]) -> Result<Value, String> {
    // Python's Session decodes with errors="replace"; invalid UTF-8 is replaced likewise.
    let text = String::from_utf8_lossy(data);
    let json: Json = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    Ok(from_json(json))
}

fn from_json(json: Json) -> Value {
    match json {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Bool(b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Value::Str(s),
        Json::Array(items) => Value::Array(items.into_iter().map(from_json).collect()),
        Json::Object(map) => Value::Map(
            map.into_iter()
                .map(|(k, v)| (Value::Str(k), from_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_conventions() {
        let v = Value::map([("a", Value::Int(1)), ("b", Value::Bin(b"hi".to_vec()))]);
        let text = encode(&v).unwrap();
        assert_eq!(std::str::from_utf8(&text).unwrap(), r#"{"a":1,"b":"aGk="}"#);
        assert!(encode(&Value::Float(f64::NAN)).is_err());
        let keyed = Value::Map(vec![(Value::Int(3), Value::Nil)]);
        assert_eq!(encode(&keyed).unwrap(), br#"{"3":null}"#);
        assert!(decode(b"{").is_err());
        assert_eq!(
            decode(b"[1, 2.5, \"x\"]").unwrap(),
            Value::Array(vec![Value::Int(1), Value::Float(2.5), Value::from("x")])
        );
    }
}
