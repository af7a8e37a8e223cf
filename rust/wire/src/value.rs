//! A dynamically typed value: what the four dict parts of a message hold.

/// A packable value. Maps keep their insertion order and may have non-string keys (msgpack);
/// the JSON packer writes scalar keys as strings, like Python's `json` module.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    Int(i64),
    /// Unsigned integers above `i64::MAX`.
    UInt(u64),
    Float(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
}

impl Value {
    /// An empty map (`{}`).
    pub fn empty_map() -> Value {
        Value::Map(Vec::new())
    }

    /// Look up a string key in a map; `None` for non-maps and missing keys.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(items) => items.iter().find_map(|(k, v)| match k {
                Value::Str(s) if s == key => Some(v),
                _ => None,
            }),
            _ => None,
        }
    }

    /// Mutable lookup of a string key in a map.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        match self {
            Value::Map(items) => items.iter_mut().find_map(|(k, v)| match k {
                Value::Str(s) if s == key => Some(v),
                _ => None,
            }),
            _ => None,
        }
    }

    /// Insert or replace a string key in a map. Does nothing on non-maps.
    pub fn set(&mut self, key: &str, value: Value) {
        if let Value::Map(items) = self {
            for (k, v) in items.iter_mut() {
                if matches!(k, Value::Str(s) if s == key) {
                    *v = value;
                    return;
                }
            }
            items.push((Value::Str(key.to_owned()), value));
        }
    }

    /// Remove a string key from a map; true if it was there. Does nothing on non-maps.
    pub fn remove(&mut self, key: &str) -> bool {
        if let Value::Map(items) = self {
            let before = items.len();
            items.retain(|(k, _)| !matches!(k, Value::Str(s) if s == key));
            return items.len() != before;
        }
        false
    }

    /// The string inside, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer inside, if it fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::UInt(u) => i64::try_from(*u).ok(),
            _ => None,
        }
    }

    /// The number inside as a float (ints are converted).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    /// True for `Nil`.
    pub fn is_nil(&self) -> bool {
        matches!(self, Value::Nil)
    }

    /// Build a map from string keys.
    pub fn map<I, K>(items: I) -> Value
    where
        I: IntoIterator<Item = (K, Value)>,
        K: Into<String>,
    {
        Value::Map(
            items
                .into_iter()
                .map(|(k, v)| (Value::Str(k.into()), v))
                .collect(),
        )
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

#[cfg(test)]
mod tests {
    use super::Value;

    #[test]
    fn remove_drops_only_the_key() {
        let mut m = Value::map([("a", Value::Int(1)), ("b", Value::Int(2))]);
        assert!(m.remove("a"));
        assert!(!m.remove("a"));
        assert!(m.get("a").is_none());
        assert_eq!(m.get("b"), Some(&Value::Int(2)));
        assert!(!Value::Int(3).remove("a"));
    }
}
