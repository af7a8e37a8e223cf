//! Mongo-style queries over task records: plain equality (None matches a missing value),
//! `$lt $lte $gt $gte $eq $ne $in $nin $exists $all $mod $glob`, and `$and`/`$or` of
//! sub-queries. Strings that are ISO-8601 dates compare as datetimes (naive ones as UTC).

use std::cmp::Ordering;

use fp_wire::{Packer, Value};

use super::date::{self, Micros};
use super::record::{TaskRecord, FIELDS};

/// A query or backend failure, reported to the client as `ename: evalue`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryError {
    pub ename: &'static str,
    pub evalue: String,
}

impl QueryError {
    pub fn key(evalue: impl Into<String>) -> QueryError {
        QueryError {
            ename: "KeyError",
            evalue: evalue.into(),
        }
    }
    pub fn value(evalue: impl Into<String>) -> QueryError {
        QueryError {
            ename: "ValueError",
            evalue: evalue.into(),
        }
    }
    pub fn type_(evalue: impl Into<String>) -> QueryError {
        QueryError {
            ename: "TypeError",
            evalue: evalue.into(),
        }
    }
    pub fn index(evalue: impl Into<String>) -> QueryError {
        QueryError {
            ename: "IndexError",
            evalue: evalue.into(),
        }
    }
    pub fn runtime(evalue: impl Into<String>) -> QueryError {
        QueryError {
            ename: "RuntimeError",
            evalue: evalue.into(),
        }
    }
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.ename, self.evalue)
    }
}

/// A query operand, with its date value when it is an ISO date string.
#[derive(Debug, Clone)]
pub struct Operand {
    pub value: Value,
    pub date: Option<Micros>,
}

impl Operand {
    fn new(value: Value) -> Operand {
        let date = value.as_str().and_then(date::parse);
        Operand { value, date }
    }
}

#[derive(Debug, Clone)]
pub enum Cond {
    Eq(Operand),
    Ne(Operand),
    Lt(Operand),
    Lte(Operand),
    Gt(Operand),
    Gte(Operand),
    In(Vec<Operand>),
    Nin(Vec<Operand>),
    /// `$in` / `$nin` with a string operand: Python's `value in text`, a substring test (as
    /// ipyparallel's DictDB); a value that is not a string is not in it.
    InText(String),
    NinText(String),
    Exists(bool),
    All(Vec<Operand>),
    Mod(i64, i64),
    Glob(Vec<char>),
}

#[derive(Debug, Clone)]
pub enum Query {
    /// Every condition on every named field holds.
    Fields(Vec<(String, Vec<Cond>)>),
    And(Vec<Query>),
    Or(Vec<Query>),
}

fn operand_list(op: &str, v: &Value) -> Result<Vec<Operand>, QueryError> {
    match v {
        Value::Array(items) => Ok(items.iter().cloned().map(Operand::new).collect()),
        other => Err(QueryError::type_(format!(
            "{op} needs a list, not {}",
            describe(other)
        ))),
    }
}

pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Nil => "None".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Int(i) => format!("{i}"),
        Value::UInt(u) => format!("{u}"),
        Value::Float(f) => format!("{f}"),
        Value::Str(s) => format!("{s:?}"),
        Value::Bin(b) => format!("<{} bytes>", b.len()),
        Value::Array(a) => format!("a list of {}", a.len()),
        Value::Map(m) => format!("a dict of {}", m.len()),
    }
}

fn is_operator_map(v: &Value) -> bool {
    match v {
        Value::Map(items) => {
            !items.is_empty()
                && items
                    .iter()
                    .any(|(k, _)| k.as_str().is_some_and(|s| s.starts_with('$')))
        }
        _ => false,
    }
}

fn parse_cond(op: &str, v: &Value) -> Result<Cond, QueryError> {
    let one = || Operand::new(v.clone());
    Ok(match op {
        "$eq" => Cond::Eq(one()),
        "$ne" => Cond::Ne(one()),
        "$lt" => Cond::Lt(one()),
        "$lte" => Cond::Lte(one()),
        "$gt" => Cond::Gt(one()),
        "$gte" => Cond::Gte(one()),
        "$in" => match v {
            Value::Str(s) => Cond::InText(s.clone()),
            _ => Cond::In(operand_list(op, v)?),
        },
        "$nin" => match v {
            Value::Str(s) => Cond::NinText(s.clone()),
            _ => Cond::Nin(operand_list(op, v)?),
        },
        "$all" => Cond::All(operand_list(op, v)?),
        "$exists" => match v {
            Value::Bool(b) => Cond::Exists(*b),
            Value::Int(i) => Cond::Exists(*i != 0),
            other => {
                return Err(QueryError::type_(format!(
                    "$exists needs True or False, not {}",
                    describe(other)
                )))
            }
        },
        "$mod" => {
            let pair = v.as_array().filter(|a| a.len() == 2);
            let (d, r) = match pair {
                Some([d, r]) => (d.as_i64(), r.as_i64()),
                _ => (None, None),
            };
            match (d, r) {
                (Some(0), _) => return Err(QueryError::value("$mod divisor must not be 0")),
                (Some(d), Some(r)) => Cond::Mod(d, r),
                _ => {
                    return Err(QueryError::type_(format!(
                        "$mod needs [divisor, remainder] integers, not {}",
                        describe(v)
                    )))
                }
            }
        }
        "$glob" => match v {
            Value::Str(s) => Cond::Glob(s.chars().collect()),
            other => {
                return Err(QueryError::type_(format!(
                    "$glob needs a string pattern, not {}",
                    describe(other)
                )))
            }
        },
        other => {
            return Err(QueryError::key(format!(
                "unsupported query operator {other:?}; supported: $lt $lte $gt $gte $eq $ne \
                 $in $nin $exists $all $mod $glob"
            )))
        }
    })
}

fn sub_queries(op: &str, v: &Value) -> Result<Vec<Query>, QueryError> {
    match v {
        Value::Array(items) if !items.is_empty() => items.iter().map(Query::parse).collect(),
        other => Err(QueryError::type_(format!(
            "{op} needs a non-empty list of queries, not {}",
            describe(other)
        ))),
    }
}

impl Query {
    /// Parse a query dict. Unknown operators are errors; unknown fields hold None.
    pub fn parse(q: &Value) -> Result<Query, QueryError> {
        let items = match q {
            Value::Map(items) => items,
            Value::Nil => return Ok(Query::Fields(Vec::new())),
            other => {
                return Err(QueryError::type_(format!(
                    "a query must be a dict, not {}",
                    describe(other)
                )))
            }
        };
        let mut fields = Vec::new();
        let mut extra = Vec::new();
        for (k, v) in items {
            let Some(key) = k.as_str() else {
                return Err(QueryError::key(format!(
                    "query keys must be field names, not {}",
                    describe(k)
                )));
            };
            match key {
                "$and" => extra.push(Query::And(sub_queries(key, v)?)),
                "$or" => extra.push(Query::Or(sub_queries(key, v)?)),
                // A name that is no record field is a field every record lacks (its value is
                // None), as in ipyparallel's DictDB: `{"nosuch": 1}` matches nothing.
                _ => {
                    let conds = if is_operator_map(v) {
                        let Value::Map(ops) = v else { unreachable!() };
                        let mut conds = Vec::with_capacity(ops.len());
                        for (op, arg) in ops {
                            match op.as_str() {
                                Some(op) if op.starts_with('$') => conds.push(parse_cond(op, arg)?),
                                _ => {
                                    return Err(QueryError::value(format!(
                                        "field {key:?}: a dict may not mix $operators and \
                                         plain keys"
                                    )))
                                }
                            }
                        }
                        conds
                    } else {
                        vec![Cond::Eq(Operand::new(v.clone()))]
                    };
                    fields.push((key.to_owned(), conds));
                }
            }
        }
        if extra.is_empty() {
            return Ok(Query::Fields(fields));
        }
        if !fields.is_empty() {
            extra.push(Query::Fields(fields));
        }
        Ok(Query::And(extra))
    }

    pub fn matches(&self, r: &TaskRecord, packer: Packer) -> bool {
        match self {
            Query::Fields(fields) => fields.iter().all(|(name, conds)| {
                let fv = field_value(r, name, packer);
                conds.iter().all(|c| c.holds(&fv))
            }),
            Query::And(qs) => qs.iter().all(|q| q.matches(r, packer)),
            Query::Or(qs) => qs.iter().any(|q| q.matches(r, packer)),
        }
    }

    /// The msg_ids this query pins down with plain equality / `$eq` / `$in` on `msg_id`, if
    /// any (lets a backend look them up instead of scanning).
    pub fn msg_ids(&self) -> Option<Vec<String>> {
        let Query::Fields(fields) = self else {
            return None;
        };
        for (name, conds) in fields {
            if name != "msg_id" {
                continue;
            }
            for c in conds {
                match c {
                    Cond::Eq(o) => {
                        return Some(o.value.as_str().map(str::to_owned).into_iter().collect())
                    }
                    Cond::In(list) => {
                        return Some(
                            list.iter()
                                .filter_map(|o| o.value.as_str().map(str::to_owned))
                                .collect(),
                        )
                    }
                    _ => {}
                }
            }
        }
        None
    }
}

/// A record's field as a query sees it.
enum Fv<'a> {
    Date(Option<Micros>),
    S(Option<&'a str>),
    V(Value),
}

fn field_value<'a>(r: &'a TaskRecord, name: &str, packer: Packer) -> Fv<'a> {
    if let Some(d) = r.date_field(name) {
        return Fv::Date(d);
    }
    if let Some(s) = r.str_field(name) {
        return Fv::S(s);
    }
    Fv::V(r.field(name, packer).unwrap_or(Value::Nil))
}

fn str_eq(s: &str, b: &Operand) -> bool {
    match &b.value {
        Value::Str(y) => s == y || (b.date.is_some() && date::parse(s) == b.date),
        _ => false,
    }
}

fn str_order(s: &str, o: &Operand) -> Option<Ordering> {
    match &o.value {
        Value::Str(y) => match (o.date, date::parse(s)) {
            (Some(d), Some(t)) => Some(t.cmp(&d)),
            _ => Some(s.cmp(y.as_str())),
        },
        _ => None,
    }
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Int(_) | Value::UInt(_) | Value::Float(_) => v.as_f64(),
        _ => None,
    }
}

fn values_eq(a: &Value, b: &Operand) -> bool {
    match (a, &b.value) {
        (Value::Int(x), Value::Int(y)) => x == y,
        (Value::Str(x), Value::Str(y)) => x == y || (b.date.is_some() && date::parse(x) == b.date),
        (x, y) => match (num(x), num(y)) {
            (Some(p), Some(q)) => p == q,
            _ => x == y,
        },
    }
}

fn eq(f: &Fv, o: &Operand) -> bool {
    match f {
        Fv::S(None) => o.value.is_nil(),
        Fv::S(Some(s)) => str_eq(s, o),
        Fv::Date(None) => o.value.is_nil(),
        Fv::Date(Some(t)) => o.date == Some(*t),
        Fv::V(v) => values_eq(v, o),
    }
}

fn order(f: &Fv, o: &Operand) -> Option<Ordering> {
    match f {
        Fv::S(None) | Fv::Date(None) => None,
        Fv::S(Some(s)) => str_order(s, o),
        Fv::Date(Some(t)) => o.date.map(|d| t.cmp(&d)),
        Fv::V(v) => match (v, &o.value) {
            (Value::Int(x), Value::Int(y)) => Some(x.cmp(y)),
            (Value::Str(x), Value::Str(y)) => match (o.date, date::parse(x)) {
                (Some(d), Some(t)) => Some(t.cmp(&d)),
                _ => Some(x.as_str().cmp(y.as_str())),
            },
            (x, y) => match (num(x), num(y)) {
                (Some(p), Some(q)) => p.partial_cmp(&q),
                _ => None,
            },
        },
    }
}

fn in_text(f: &Fv, text: &str) -> bool {
    match f {
        Fv::S(Some(s)) => text.contains(s),
        Fv::V(Value::Str(s)) => text.contains(s.as_str()),
        Fv::Date(Some(t)) => text.contains(&date::format(*t)),
        _ => false,
    }
}

fn present(f: &Fv) -> bool {
    match f {
        Fv::S(s) => s.is_some(),
        Fv::Date(d) => d.is_some(),
        Fv::V(v) => !v.is_nil(),
    }
}

impl Cond {
    fn holds(&self, f: &Fv) -> bool {
        use Ordering::*;
        match self {
            Cond::Eq(o) => eq(f, o),
            Cond::Ne(o) => !eq(f, o),
            Cond::Lt(o) => order(f, o) == Some(Less),
            Cond::Lte(o) => matches!(order(f, o), Some(Less | Equal)),
            Cond::Gt(o) => order(f, o) == Some(Greater),
            Cond::Gte(o) => matches!(order(f, o), Some(Greater | Equal)),
            Cond::In(list) => list.iter().any(|o| eq(f, o)),
            Cond::Nin(list) => !list.iter().any(|o| eq(f, o)),
            Cond::InText(text) => in_text(f, text),
            Cond::NinText(text) => !in_text(f, text),
            Cond::Exists(want) => present(f) == *want,
            Cond::All(list) => match f {
                Fv::V(Value::Array(items)) => list.iter().all(|o| {
                    items
                        .iter()
                        .any(|it| values_eq(it, o) || matches!(it, Value::Nil) && o.value.is_nil())
                }),
                _ => false,
            },
            Cond::Mod(d, r) => match f {
                Fv::V(v) => match (v, num(v)) {
                    (Value::Int(i), _) => i.rem_euclid(*d) == r.rem_euclid(*d),
                    (_, Some(x)) => {
                        x.fract() == 0.0 && (x as i64).rem_euclid(*d) == r.rem_euclid(*d)
                    }
                    _ => false,
                },
                Fv::Date(_) | Fv::S(_) => false,
            },
            Cond::Glob(p) => match f {
                Fv::S(Some(s)) => glob(p, &s.chars().collect::<Vec<_>>()),
                Fv::V(Value::Str(s)) => glob(p, &s.chars().collect::<Vec<_>>()),
                Fv::Date(Some(t)) => glob(p, &date::format(*t).chars().collect::<Vec<_>>()),
                _ => false,
            },
        }
    }
}

/// Does `s` match the shell pattern `p` (`*`, `?`, `[seq]`, `[!seq]`), like `fnmatch`
/// (case-sensitive)?
pub fn glob(p: &[char], s: &[char]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        let step = if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, si));
                    pi += 1;
                    continue;
                }
                '?' => Some(pi + 1),
                '[' => class(p, pi, s[si]),
                c => (c == s[si]).then_some(pi + 1),
            }
        } else {
            None
        };
        match step {
            Some(next) => {
                pi = next;
                si += 1;
            }
            None => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Match `c` against the class starting at `p[at] == '['`: the index after the class if it
/// matches. An unterminated `[` is a literal.
fn class(p: &[char], at: usize, c: char) -> Option<usize> {
    let mut i = at + 1;
    let negate = p.get(i) == Some(&'!');
    if negate {
        i += 1;
    }
    let start = i;
    let mut hit = false;
    loop {
        let Some(&ch) = p.get(i) else {
            // no closing bracket: '[' matches itself
            return (c == '[').then_some(at + 1);
        };
        if ch == ']' && i > start {
            break;
        }
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|e| *e != ']') {
            let hi = p[i + 2];
            if ch <= c && c <= hi {
                hit = true;
            }
            i += 3;
        } else {
            if ch == c {
                hit = true;
            }
            i += 1;
        }
    }
    (hit != negate).then_some(i + 1)
}

/// Which fields to return: `None` = every field but the two buffer lists.
pub fn projection(keys: &Value) -> Result<Vec<&'static str>, QueryError> {
    match keys {
        // no keys, or an empty list (as ipyparallel's hub reads it): the whole record
        Value::Nil => Ok(FIELDS
            .iter()
            .copied()
            .filter(|f| *f != "buffers" && *f != "result_buffers")
            .collect()),
        Value::Array(items) if items.is_empty() => projection(&Value::Nil),
        Value::Array(items) => {
            let mut out = vec!["msg_id"];
            for k in items {
                let name = k.as_str().ok_or_else(|| {
                    QueryError::type_(format!("keys must be field names, not {}", describe(k)))
                })?;
                let field = FIELDS.iter().copied().find(|f| *f == name).ok_or_else(|| {
                    QueryError::key(format!(
                        "unknown task record field {name:?}; fields: {}",
                        FIELDS.join(", ")
                    ))
                })?;
                if !out.contains(&field) {
                    out.push(field);
                }
            }
            Ok(out)
        }
        other => Err(QueryError::type_(format!(
            "keys must be a list of field names or None, not {}",
            describe(other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::memory::Memory;
    use crate::records::record::Update;
    use crate::records::Backend;

    const P: Packer = Packer::Msgpack;

    fn rec(
        id: &str,
        secs: i64,
        engine: Option<&str>,
        done: bool,
        label: Option<&str>,
    ) -> TaskRecord {
        let mut md = Value::map([("n", Value::Int(secs))]);
        if let Some(l) = label {
            md.set("label", Value::from(l));
        }
        TaskRecord {
            msg_id: id.into(),
            submitted: Some(secs * 1_000_000),
            completed: done.then_some(secs * 1_000_000 + 500_000),
            engine_uuid: engine.map(str::to_owned),
            queue: Some("task".into()),
            metadata: Some(P.pack(&md).unwrap()),
            header: Some(
                P.pack(&Value::map([
                    ("msg_id", Value::from(id)),
                    (
                        "tags",
                        Value::Array(vec![Value::from("a"), Value::from("b")]),
                    ),
                ]))
                .unwrap(),
            ),
            stdout: format!("out {id}"),
            ..TaskRecord::default()
        }
    }

    fn db() -> Vec<TaskRecord> {
        vec![
            rec("m1", 10, Some("e0"), true, Some("alpha")),
            rec("m2", 20, Some("e1"), true, None),
            rec("m3", 30, None, false, Some("beta")),
        ]
    }

    fn q(v: Value) -> Query {
        Query::parse(&v).unwrap()
    }

    fn ids(query: Value) -> Vec<String> {
        let query = q(query);
        db().iter()
            .filter(|r| query.matches(r, P))
            .map(|r| r.msg_id.clone())
            .collect()
    }

    fn op(field: &str, op: &str, v: Value) -> Value {
        Value::map([(field, Value::map([(op, v)]))])
    }

    fn s(x: &str) -> Value {
        Value::from(x)
    }

    fn list(items: &[Value]) -> Value {
        Value::Array(items.to_vec())
    }

    #[test]
    fn plain_equality_and_none() {
        assert_eq!(ids(Value::map([("msg_id", s("m2"))])), ["m2"]);
        assert_eq!(ids(Value::map([("engine_uuid", Value::Nil)])), ["m3"]);
        assert_eq!(ids(Value::map([("completed", Value::Nil)])), ["m3"]);
        assert_eq!(ids(Value::map([("label", Value::Nil)])), ["m2"]);
        assert_eq!(ids(Value::map([("label", s("alpha"))])), ["m1"]);
        // several plain keys are each compared with their own value (no §14 quirk 15)
        assert_eq!(
            ids(Value::map([("engine_uuid", s("e0")), ("queue", s("task"))])),
            ["m1"]
        );
        assert!(ids(Value::map([("engine_uuid", s("e0")), ("msg_id", s("m2"))])).is_empty());
        assert_eq!(ids(Value::empty_map()).len(), 3);
        assert_eq!(ids(Value::Nil).len(), 3);
    }

    #[test]
    fn comparisons_on_dates_strings_numbers() {
        let t20 = "1970-01-01T00:00:20Z";
        assert_eq!(ids(op("submitted", "$lt", s(t20))), ["m1"]);
        assert_eq!(ids(op("submitted", "$lte", s(t20))), ["m1", "m2"]);
        // $gt is greater-than (not reversed, §14 quirk 1)
        assert_eq!(ids(op("submitted", "$gt", s(t20))), ["m3"]);
        assert_eq!(ids(op("submitted", "$gte", s(t20))), ["m2", "m3"]);
        assert_eq!(
            ids(op(
                "submitted",
                "$eq",
                s("1970-01-01T00:00:20.000000+00:00")
            )),
            ["m2"]
        );
        assert_eq!(ids(op("submitted", "$ne", s(t20))), ["m1", "m3"]);
        // naive ISO is UTC; offsets are honoured
        assert_eq!(
            ids(op("submitted", "$lt", s("1970-01-01T01:00:15+01:00"))),
            ["m1"]
        );
        // missing dates never compare
        assert_eq!(ids(op("completed", "$gt", s("1970-01-01"))), ["m1", "m2"]);
        assert_eq!(ids(op("msg_id", "$gt", s("m1"))), ["m2", "m3"]);
        assert_eq!(ids(op("stdout", "$lte", s("out m2"))), ["m1", "m2"]);
        let both = Value::map([(
            "submitted",
            Value::map([
                ("$gt", s("1970-01-01T00:00:10Z")),
                ("$lt", s("1970-01-01T00:00:30Z")),
            ]),
        )]);
        assert_eq!(ids(both), ["m2"]);
        // numbers inside dicts compare by equality
        let md = Value::map([("n", Value::Float(10.0))]);
        assert_eq!(ids(Value::map([("metadata", md)])), Vec::<String>::new());
    }

    #[test]
    fn membership_exists_all_mod_glob() {
        assert_eq!(
            ids(op("msg_id", "$in", list(&[s("m1"), s("m3"), s("zz")]))),
            ["m1", "m3"]
        );
        assert_eq!(
            ids(op("engine_uuid", "$in", list(&[Value::Nil, s("e1")]))),
            ["m2", "m3"]
        );
        assert_eq!(ids(op("msg_id", "$nin", list(&[s("m1")]))), ["m2", "m3"]);
        // a string operand is Python's `value in text` (substring); None is in no text
        assert_eq!(ids(op("msg_id", "$in", s("m1 m3"))), ["m1", "m3"]);
        assert_eq!(ids(op("engine_uuid", "$in", s("e0e1"))), ["m1", "m2"]);
        assert_eq!(ids(op("engine_uuid", "$nin", s(""))), ["m1", "m2", "m3"]);
        assert_eq!(ids(op("msg_id", "$nin", s("m2"))), ["m1", "m3"]);
        assert_eq!(
            ids(op("engine_uuid", "$nin", list(&[s("e0"), s("e1")]))),
            ["m3"]
        );
        assert_eq!(
            ids(op("engine_uuid", "$exists", Value::Bool(true))),
            ["m1", "m2"]
        );
        assert_eq!(ids(op("completed", "$exists", Value::Bool(false))), ["m3"]);
        assert_eq!(ids(op("label", "$glob", s("*ph*"))), ["m1"]);
        assert_eq!(ids(op("msg_id", "$glob", s("m[!2]"))), ["m1", "m3"]);
        assert_eq!(ids(op("msg_id", "$glob", s("m?"))).len(), 3);
        assert_eq!(
            ids(op("submitted", "$glob", s("1970-01-01T00:00:3*"))),
            ["m3"]
        );
        // None never matches a glob
        assert_eq!(ids(op("engine_uuid", "$glob", s("*"))), ["m1", "m2"]);
        let mut r = rec("x", 1, None, true, None);
        r.stdout = "7".into();
        let n = Value::map([(
            "stdout",
            Value::map([("$mod", list(&[Value::Int(3), Value::Int(1)]))]),
        )]);
        assert!(!q(n).matches(&r, P));
        // $mod and $all on values inside lists / numbers via $or of sub-queries
        let all = |v: &[&str]| {
            let vals: Vec<Value> = v.iter().map(|x| s(x)).collect();
            Cond::All(vals.into_iter().map(Operand::new).collect())
        };
        let tags = Fv::V(list(&[s("a"), s("b")]));
        assert!(all(&["a"]).holds(&tags));
        assert!(all(&["a", "b"]).holds(&tags));
        assert!(!all(&["a", "c"]).holds(&tags));
        assert!(!all(&["a"]).holds(&Fv::V(s("a"))));
        assert!(Cond::Mod(3, 1).holds(&Fv::V(Value::Int(7))));
        assert!(Cond::Mod(3, 1).holds(&Fv::V(Value::Float(7.0))));
        assert!(!Cond::Mod(3, 1).holds(&Fv::V(Value::Int(6))));
        assert!(!Cond::Mod(3, 1).holds(&Fv::V(Value::Nil)));
        let or = Value::map([(
            "$or",
            list(&[
                Value::map([("msg_id", s("m1"))]),
                Value::map([("msg_id", s("m3"))]),
            ]),
        )]);
        assert_eq!(ids(or), ["m1", "m3"]);
    }

    #[test]
    fn glob_patterns() {
        let g = |p: &str, t: &str| {
            glob(
                &p.chars().collect::<Vec<_>>(),
                &t.chars().collect::<Vec<_>>(),
            )
        };
        assert!(g("*", ""));
        assert!(g("a*c", "abbbc"));
        assert!(!g("a*c", "abbbd"));
        assert!(g("[a-c]x", "bx"));
        assert!(!g("[!a-c]x", "bx"));
        assert!(g("[]]", "]"));
        assert!(g("[", "["));
        assert!(g("*.py", "x.py"));
        assert!(!g("?", ""));
    }

    #[test]
    fn errors() {
        let bad = |v: Value| Query::parse(&v).unwrap_err();
        assert_eq!(bad(op("msg_id", "$regex", s("x"))).ename, "KeyError");
        // a name that is no field is one every record lacks (ipyparallel's DictDB)
        assert!(Query::parse(&Value::map([("nosuch", s("x"))])).is_ok());
        assert_eq!(bad(op("msg_id", "$in", Value::Int(3))).ename, "TypeError");
        assert_eq!(bad(op("msg_id", "$exists", s("x"))).ename, "TypeError");
        assert_eq!(
            bad(op("msg_id", "$mod", list(&[Value::Int(0), Value::Int(1)]))).ename,
            "ValueError"
        );
        assert_eq!(
            bad(op("msg_id", "$mod", list(&[Value::Int(2)]))).ename,
            "TypeError"
        );
        assert_eq!(bad(op("msg_id", "$glob", Value::Int(2))).ename, "TypeError");
        assert_eq!(bad(list(&[])).ename, "TypeError");
        let mixed = Value::map([("msg_id", Value::map([("$eq", s("a")), ("b", s("c"))]))]);
        assert_eq!(bad(mixed).ename, "ValueError");
        assert_eq!(bad(Value::map([("$or", s("x"))])).ename, "TypeError");
    }

    #[test]
    fn projection_keys() {
        let all = projection(&Value::Nil).unwrap();
        assert!(!all.contains(&"buffers") && !all.contains(&"result_buffers"));
        assert_eq!(all.len(), FIELDS.len() - 2);
        assert_eq!(projection(&list(&[])).unwrap(), all);
        let p = projection(&list(&[s("completed"), s("buffers")])).unwrap();
        assert_eq!(p, ["msg_id", "completed", "buffers"]);
        assert_eq!(
            projection(&list(&[s("nope")])).unwrap_err().ename,
            "KeyError"
        );
        assert_eq!(
            projection(&list(&[Value::Int(1)])).unwrap_err().ename,
            "TypeError"
        );
        assert_eq!(projection(&s("msg_id")).unwrap_err().ename, "TypeError");
    }

    #[test]
    fn memory_backend_culls_and_reports() {
        let mut m = Memory::new(10, 1 << 30, P);
        for i in 0..25 {
            m.add(rec(&format!("r{i}"), i, None, true, None));
        }
        let h = m.history().unwrap();
        assert!(h.len() <= 10, "{}", h.len());
        assert_eq!(h.last().unwrap().0, "r24");
        let e = m.get("r0").unwrap_err();
        assert_eq!(e.ename, "KeyError");
        assert!(e.evalue.contains("culled"), "{}", e.evalue);
        assert!(m.get("nope").unwrap_err().evalue.contains("no task record"));
        // updates of culled records do not bring them back
        m.update("r0", Update::Stdout("late".into()));
        assert!(m.get("r0").is_err());
        // iopub before the request: an empty record, merged when the request arrives
        m.update("early", Update::Stdout("hi".into()));
        m.add(rec("early", 100, Some("e9"), false, None));
        let r = m.get("early").unwrap();
        assert_eq!(r.stdout, "hi");
        assert_eq!(r.engine_uuid.as_deref(), Some("e9"));
        // size limit
        let mut m = Memory::new(1000, 4096, P);
        for i in 0..20 {
            let mut r = rec(&format!("s{i}"), i, None, true, None);
            r.stdout = "x".repeat(1000);
            m.add(r);
        }
        let n = m.history().unwrap().len();
        assert!((1..=4).contains(&n), "{n}");
        assert!(m.get("s0").unwrap_err().evalue.contains("culled"));
    }

    #[test]
    fn record_fields_round_trip() {
        let r = rec("m1", 10, Some("e0"), true, Some("alpha"));
        assert_eq!(
            r.field("submitted", P),
            Some(s("1970-01-01T00:00:10.000000Z"))
        );
        assert_eq!(r.field("label", P), Some(s("alpha")));
        assert_eq!(r.field("started", P), Some(Value::Nil));
        assert_eq!(r.field("header", P).unwrap().get("msg_id"), Some(&s("m1")));
        assert_eq!(r.field("nope", P), None);
    }
}
