//! Decoding request bodies with errors that name the field at fault.

use serde::de::DeserializeOwned;

use crate::ErrorBody;

/// Parses a JSON body into `T`. Type errors name the field by its path (`messages[0].content`),
/// unknown fields by their name, syntax errors the body.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ErrorBody> {
    decode(&mut serde_json::Deserializer::from_slice(body))
}

/// Decodes an already parsed JSON value into `T`, naming the field at fault as [`parse`] does
/// (for a body that is decoded into more than one type).
pub fn from_value<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, ErrorBody> {
    decode(value)
}

fn decode<'de, D, T>(de: D) -> Result<T, ErrorBody>
where
    D: serde::Deserializer<'de, Error = serde_json::Error>,
    T: DeserializeOwned,
{
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.starts_with('[') {
            // A top-level array: the body is not an object at all.
            ErrorBody::invalid("body", "the request body must be a JSON object")
        } else if inner.is_syntax() || inner.is_eof() {
            ErrorBody::invalid(
                "body",
                format!("the request body is not valid JSON: {inner}"),
            )
        } else if path == "." {
            // Top-level problems (an unknown field, a missing value) name it in serde's text.
            let msg = inner.to_string();
            let field = quoted_field(&msg, "unknown field `")
                .or_else(|| quoted_field(&msg, "missing field `"))
                .unwrap_or_else(|| "body".into());
            ErrorBody::invalid(field, format!("invalid request: {inner}"))
        } else {
            ErrorBody::invalid(path.clone(), format!("{path}: {inner}"))
        }
    })
}

/// Pulls the name out of serde's "unknown field `x`, expected ..." message.
fn quoted_field(message: &str, prefix: &str) -> Option<String> {
    let rest = message.strip_prefix(prefix)?;
    Some(rest[..rest.find('`')?].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::GenerateRequest;
    use crate::ErrorCode;

    #[test]
    fn parse_errors_name_the_field() {
        let field = |body: &str| {
            parse::<GenerateRequest>(body.as_bytes())
                .unwrap_err()
                .field
                .unwrap()
        };
        assert_eq!(field(r#"{"prompt":"x","max_tokens":"ten"}"#), "max_tokens");
        assert_eq!(field(r#"{"prompt":"x","temprature":1}"#), "temprature");
        assert_eq!(field(r#"{"prompt":"x","#), "body");
        assert_eq!(
            field(r#"{"messages":[{"role":"user","content":5}]}"#),
            "messages[0].content"
        );
        assert_eq!(field(r#"[1]"#), "body");
        let err = parse::<GenerateRequest>(br#"{"prompt":"x","max_tokens":-1}"#).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("max_tokens"));
        assert_eq!(err.code, ErrorCode::InvalidParams);
        let err = parse::<crate::task::TaskRequest>(br#"{"prompt":"x"}"#).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("model_ref"));
        let value: serde_json::Value =
            serde_json::from_str(r#"{"messages":[{"role":"user","content":5}]}"#).unwrap();
        let err = from_value::<GenerateRequest>(&value).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("messages[0].content"));
    }
}
