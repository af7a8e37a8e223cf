//! Building the messages the controller itself sends.

use fp_wire::Value;

/// `apply_request` → `apply_reply`, anything else `x_request` → `x_reply`.
pub fn reply_type(request_type: &str) -> String {
    match request_type.strip_suffix("_request") {
        Some(prefix) => format!("{prefix}_reply"),
        None => format!("{request_type}_reply"),
    }
}

/// Error content in the ipyparallel wrapped-exception form.
pub fn error_content(ename: &str, evalue: &str) -> Value {
    Value::map([
        ("status", Value::from("error")),
        ("ename", Value::from(ename)),
        ("evalue", Value::from(evalue)),
        (
            "traceback",
            Value::Array(vec![Value::Str(format!("{ename}: {evalue}"))]),
        ),
    ])
}

/// Error content of a hub query failure: [`error_content`] plus an empty `engine_info`, as
/// ipyparallel's hub sends it (its `wrap_exception` always adds the key).
pub fn hub_error_content(ename: &str, evalue: &str) -> Value {
    let mut content = error_content(ename, evalue);
    content.set("engine_info", Value::empty_map());
    content
}

/// Reply metadata for a controller-generated failure.
pub fn error_metadata(engine_uuid: Option<&str>) -> Value {
    let mut md = Value::map([
        ("status", Value::from("error")),
        ("dependencies_met", Value::Bool(true)),
        ("date", Value::Str(fp_wire::iso_now())),
    ]);
    if let Some(u) = engine_uuid {
        md.set("engine", Value::from(u));
    }
    md
}

pub fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|x| x.as_str())
}
