//! Reading request bodies by hand, where serde's error would not say which element of a list
//! is at fault: each refusal names the place (`messages[2].content[0].type`, `input[1].call_id`).

use llorch_wire::ErrorBody;
use serde_json::{Map, Value};

type Result<T> = std::result::Result<T, ErrorBody>;

pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> ErrorBody {
    ErrorBody::invalid(field, message)
}

/// An object's string field, or a refusal naming `at.key`.
pub(crate) fn string_at(obj: &Map<String, Value>, key: &str, at: &str) -> Result<String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(invalid(
            format!("{at}.{key}"),
            format!("{at}.{key} must be a string"),
        )),
        None => Err(invalid(
            format!("{at}.{key}"),
            format!("{at}.{key}: field required"),
        )),
    }
}

/// An object's optional string field (absent or null is `None`).
pub(crate) fn optional_string_at(
    obj: &Map<String, Value>,
    key: &str,
    at: &str,
) -> Result<Option<String>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => string_at(obj, key, at).map(Some),
    }
}

/// Refuses keys of `obj` outside `known`, naming the first.
pub(crate) fn known_keys(obj: &Map<String, Value>, known: &[&str], at: &str) -> Result<()> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(invalid(
            format!("{at}.{k}"),
            format!(
                "{at}.{k}: this server does not take this field (known: {})",
                known.join(", ")
            ),
        )),
    }
}

/// `v` as an object, or a refusal naming `at`.
pub(crate) fn object<'a>(v: &'a Value, at: &str) -> Result<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| invalid(at, format!("{at} must be an object")))
}
