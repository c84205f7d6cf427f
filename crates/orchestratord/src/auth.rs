//! API keys: loaded from a file (one `NAME KEY` pair per line), compared in constant time, and
//! named in logs only by their name or a short fingerprint (first 8 hex digits of the key's
//! sha256).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Keys shorter than this are refused: they could be guessed.
pub const MIN_KEY_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read API key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message} (each line is `NAME KEY`; `#` starts a comment)")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("API key file {0} holds no keys; add `NAME KEY` lines or leave the option out to run without keys on loopback")]
    Empty(PathBuf),
}

struct Key {
    name: String,
    digest: [u8; 32],
}

/// A set of named API keys.
pub struct ApiKeys {
    keys: Vec<Key>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.keys.iter().map(|k| k.name.as_str()).collect();
        f.debug_struct("ApiKeys").field("names", &names).finish()
    }
}

/// The short fingerprint of a key that may appear in logs.
pub fn fingerprint(key: &str) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..4])
}

impl ApiKeys {
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, KeysError> {
        let mut keys: Vec<Key> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_err = |message: String| KeysError::Line {
                path: path.to_owned(),
                line: i + 1,
                message,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(name), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(line_err("expected a name and a key".into()));
            };
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
            {
                return Err(line_err(format!(
                    "name {name:?} may hold only letters, digits, - _ . @"
                )));
            }
            if key.len() < MIN_KEY_LEN {
                return Err(line_err(format!(
                    "the key of {name:?} is shorter than {MIN_KEY_LEN} characters"
                )));
            }
            if keys.iter().any(|k| k.name == name) {
                return Err(line_err(format!("name {name:?} appears twice")));
            }
            keys.push(Key {
                name: name.to_string(),
                digest: Sha256::digest(key.as_bytes()).into(),
            });
        }
        if keys.is_empty() {
            return Err(KeysError::Empty(path.to_owned()));
        }
        Ok(Self { keys })
    }

    /// The name of the key, if `presented` is one. Every stored key is compared (in constant
    /// time, on digests of equal length), so the time taken says nothing about which matched.
    pub fn check(&self, presented: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.digest.ct_eq(&digest)) {
                found = Some(k.name.as_str());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The key a request presents: `Authorization: Bearer KEY` (what OpenAI clients send) or
/// `X-API-Key: KEY`.
pub fn presented_key(headers: &hyper::HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if let Some(k) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
        {
            return Some(k.trim());
        }
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_checks_and_names_bad_lines() {
        let p = Path::new("keys");
        let keys = ApiKeys::parse(
            "# agents\nalice 0123456789abcdef0123\n\nbob   fedcba9876543210fedc\n",
            p,
        )
        .unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.check("0123456789abcdef0123"), Some("alice"));
        assert_eq!(keys.check("fedcba9876543210fedc"), Some("bob"));
        assert_eq!(keys.check("0123456789abcdef012"), None);
        assert_eq!(keys.check(""), None);
        let err = ApiKeys::parse("alice short\n", p).unwrap_err().to_string();
        assert!(err.starts_with("keys:1:"), "{err}");
        let err = ApiKeys::parse("ok 0123456789abcdef0123\nlonely\n", p)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("keys:2:"), "{err}");
        assert!(ApiKeys::parse("# nothing\n", p).is_err());
        assert_eq!(fingerprint("x").len(), 8);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any file text: parsed or refused with its line, never a panic; a parsed file
        /// finds each of its keys.
        #[test]
        fn any_keys_file_parses_or_names_its_line(text in "[a-z0-9 #\t\n\r\\-]{0,400}") {
            match ApiKeys::parse(&text, Path::new("keys")) {
                Ok(keys) => proptest::prop_assert!(!keys.is_empty()),
                Err(e) => proptest::prop_assert!(e.to_string().contains("keys"), "{}", e),
            }
        }
    }
}
