//! Checks a JSON Schema before the engine turns it into a llama.cpp grammar (structured output).
//!
//! llama.cpp's converter (`json_schema_to_grammar`) silently ignores the keywords it cannot
//! express, so an answer "constrained" by such a schema could still fail to validate against it.
//! This check runs first, in orchestratord and in the engine, and names the part of the schema it
//! refuses as a JSON pointer (`#/properties/age/multipleOf`):
//!
//! - always refused: a schema that is not an object, a `type` that is not a JSON type, a `$ref`
//!   outside the document or that does not resolve, malformed keyword values (`required` that is
//!   not a list of strings, negative `minItems`, an empty `anyOf` ...), nesting deeper than
//!   [`MAX_DEPTH`];
//! - refused with `strict` (OpenAI's "the answer must validate"), ignored without it: the
//!   keywords the grammar cannot enforce (`multipleOf`, `not`, `if`, `uniqueItems`,
//!   `patternProperties`, bounds on `number`, formats other than date, time, date-time and uuid,
//!   patterns not anchored with `^` and `$` ...).
//!
//! Annotations (`title`, `description`, `default`, `examples` ...) and unknown keywords are
//! ignored, as JSON Schema says.

use serde_json::{Map, Value};

/// Deepest nesting of schemas accepted (each `properties`, `items`, `anyOf` ... is one level).
pub const MAX_DEPTH: usize = 64;

/// Keywords the converter cannot enforce.
const UNENFORCEABLE: &[&str] = &[
    "multipleOf",
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "minProperties",
    "maxProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
    "contentEncoding",
    "contentMediaType",
    "contentSchema",
];

const TYPES: &[&str] = &[
    "object", "array", "string", "integer", "number", "boolean", "null",
];
const FORMATS: &[&str] = &["date", "time", "date-time", "uuid"];

/// What is wrong and where: `path` is a JSON pointer into the schema (`#` is its root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at {}: {}", self.path, self.message)
    }
}

/// Checks `schema` (see the module documentation for what `strict` adds).
pub fn check(schema: &Value, strict: bool) -> Result<(), SchemaError> {
    Walk {
        root: schema,
        strict,
    }
    .schema(schema, "#", 0)
}

struct Walk<'a> {
    root: &'a Value,
    strict: bool,
}

fn err(path: &str, message: impl Into<String>) -> SchemaError {
    SchemaError {
        path: path.to_string(),
        message: message.into(),
    }
}

/// Escapes a property name for a JSON pointer (RFC 6901).
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

impl Walk<'_> {
    fn schema(&self, v: &Value, path: &str, depth: usize) -> Result<(), SchemaError> {
        if depth > MAX_DEPTH {
            return Err(err(
                path,
                format!("schemas nest deeper than {MAX_DEPTH} levels"),
            ));
        }
        let Value::Object(map) = v else {
            return Err(err(path, "a schema must be a JSON object"));
        };
        let types = self.types(map, path)?;
        for (key, value) in map {
            let at = format!("{path}/{}", escape(key));
            match key.as_str() {
                "properties" | "$defs" | "definitions" => {
                    let Value::Object(children) = value else {
                        return Err(err(&at, format!("{key} must be an object of schemas")));
                    };
                    for (name, child) in children {
                        self.schema(child, &format!("{at}/{}", escape(name)), depth + 1)?;
                    }
                }
                "required"
                    if !value
                        .as_array()
                        .is_some_and(|a| a.iter().all(Value::is_string)) =>
                {
                    return Err(err(&at, "required must be a list of property names"));
                }
                "additionalProperties" if !value.is_boolean() => {
                    self.schema(value, &at, depth + 1)?;
                }
                "items" => match value {
                    Value::Array(items) => self.list(items, &at, depth)?,
                    Value::Bool(_) => {}
                    other => self.schema(other, &at, depth + 1)?,
                },
                "prefixItems" => match value {
                    Value::Array(items) => self.list(items, &at, depth)?,
                    _ => return Err(err(&at, "prefixItems must be a list of schemas")),
                },
                "anyOf" | "oneOf" | "allOf" => match value {
                    Value::Array(items) if !items.is_empty() => self.list(items, &at, depth)?,
                    _ => {
                        return Err(err(
                            &at,
                            format!("{key} must be a non-empty list of schemas"),
                        ))
                    }
                },
                "minItems" | "maxItems" | "minLength" | "maxLength" if !value.is_u64() => {
                    return Err(err(&at, format!("{key} must be an integer of 0 or more")));
                }
                "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" => {
                    if !value.is_number() {
                        return Err(err(&at, format!("{key} must be a number")));
                    }
                    if self.strict && !types.iter().all(|t| *t == "integer") {
                        return Err(err(
                            &at,
                            format!("{key} is enforced only on integers (type \"integer\"); the grammar cannot bound other numbers"),
                        ));
                    }
                }
                "enum" if value.as_array().is_none_or(|a| a.is_empty()) => {
                    return Err(err(&at, "enum must be a non-empty list"));
                }
                "pattern" => {
                    let Some(p) = value.as_str() else {
                        return Err(err(&at, "pattern must be a string"));
                    };
                    if self.strict && !(p.starts_with('^') && p.ends_with('$')) {
                        return Err(err(
                            &at,
                            "pattern must be anchored with ^ and $ to be enforced",
                        ));
                    }
                }
                "format" => {
                    let Some(f) = value.as_str() else {
                        return Err(err(&at, "format must be a string"));
                    };
                    if self.strict && !FORMATS.contains(&f) {
                        return Err(err(
                            &at,
                            format!(
                                "format {f:?} cannot be enforced; the enforced formats are {}",
                                FORMATS.join(", ")
                            ),
                        ));
                    }
                }
                "$ref" => self.reference(value, &at)?,
                k if self.strict && UNENFORCEABLE.contains(&k) => {
                    return Err(err(
                        &at,
                        format!("{k} cannot be enforced while decoding; remove it or set strict to false"),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn list(&self, items: &[Value], path: &str, depth: usize) -> Result<(), SchemaError> {
        for (i, item) in items.iter().enumerate() {
            self.schema(item, &format!("{path}/{i}"), depth + 1)?;
        }
        Ok(())
    }

    /// The schema's `type` as a list (empty: none given).
    fn types<'v>(
        &self,
        map: &'v Map<String, Value>,
        path: &str,
    ) -> Result<Vec<&'v str>, SchemaError> {
        let at = format!("{path}/type");
        let names: Vec<&Value> = match map.get("type") {
            None => return Ok(Vec::new()),
            Some(Value::Array(a)) if !a.is_empty() => a.iter().collect(),
            Some(Value::String(_)) => vec![&map["type"]],
            Some(_) => {
                return Err(err(
                    &at,
                    "type must be a type name or a non-empty list of them",
                ))
            }
        };
        names
            .into_iter()
            .map(|n| match n.as_str() {
                Some(t) if TYPES.contains(&t) => Ok(t),
                _ => Err(err(
                    &at,
                    format!(
                        "type {n} is not a JSON type; use one of {}",
                        TYPES.join(", ")
                    ),
                )),
            })
            .collect()
    }

    fn reference(&self, value: &Value, path: &str) -> Result<(), SchemaError> {
        let Some(r) = value.as_str() else {
            return Err(err(path, "$ref must be a string"));
        };
        let Some(pointer) = r.strip_prefix('#') else {
            return Err(err(
                path,
                format!("$ref {r:?} points outside this schema; only \"#/...\" references are supported"),
            ));
        };
        if pointer.is_empty() {
            return Ok(());
        }
        if self.root.pointer(pointer).is_none() {
            return Err(err(path, format!("$ref {r:?} does not resolve")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn path_of(schema: Value, strict: bool) -> String {
        check(&schema, strict).unwrap_err().path
    }

    #[test]
    fn ordinary_schemas_pass() {
        let s = json!({
            "type": "object",
            "title": "Person",
            "properties": {
                "name": {"type": "string", "minLength": 1, "description": "x"},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                "kind": {"enum": ["a", "b"]},
                "when": {"type": "string", "format": "date"},
                "id": {"type": "string", "pattern": "^[a-z]+$"},
                "next": {"$ref": "#/$defs/node"},
                "either": {"anyOf": [{"type": "null"}, {"type": ["string", "number"]}]}
            },
            "required": ["name", "age"],
            "additionalProperties": false,
            "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}}
        });
        check(&s, true).unwrap();
        check(&json!({}), true).unwrap();
    }

    #[test]
    fn each_refusal_names_its_place() {
        assert_eq!(path_of(json!([]), false), "#");
        assert_eq!(
            path_of(json!({"properties": {"a": {"type": "text"}}}), false),
            "#/properties/a/type"
        );
        assert_eq!(
            path_of(
                json!({"properties": {"a/b": {"$ref": "#/$defs/none"}}}),
                false
            ),
            "#/properties/a~1b/$ref"
        );
        assert_eq!(
            path_of(json!({"$ref": "https://example.com/s.json"}), false),
            "#/$ref"
        );
        assert_eq!(path_of(json!({"anyOf": []}), false), "#/anyOf");
        assert_eq!(path_of(json!({"required": [1]}), false), "#/required");
        assert_eq!(
            path_of(json!({"items": {"minItems": -1}}), false),
            "#/items/minItems"
        );
        // Unenforceable keywords: refused with strict only.
        let s = json!({"properties": {"n": {"type": "integer", "multipleOf": 2}}});
        assert_eq!(path_of(s.clone(), true), "#/properties/n/multipleOf");
        check(&s, false).unwrap();
        let s = json!({"type": "number", "minimum": 0.5});
        assert_eq!(path_of(s.clone(), true), "#/minimum");
        check(&s, false).unwrap();
        assert_eq!(
            path_of(json!({"type": "string", "format": "email"}), true),
            "#/format"
        );
        assert_eq!(
            path_of(json!({"type": "string", "pattern": "[a-z]+"}), true),
            "#/pattern"
        );
    }

    #[test]
    fn depth_is_bounded() {
        let mut s = json!({"type": "string"});
        for _ in 0..=MAX_DEPTH {
            s = json!({"items": s});
        }
        let e = check(&s, false).unwrap_err();
        assert!(e.message.contains("deeper"), "{e}");
    }
}
