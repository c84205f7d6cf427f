//! API keys and node tokens: loaded from a file (one `NAME KEY` pair per line), compared in
//! constant time, and named in logs only by their name or a short fingerprint (first 8 hex
//! digits of the key's sha256).
//!
//! - An API key line may end in `admin`: only such keys reach the operator endpoints (drain,
//!   resume, the node list).
//! - A node token's NAME is the node id it may register and heartbeat as, so one worker's
//!   token cannot impersonate another. A single line named `*` lets its token act as any node
//!   id: what a one-node home install generates, where there is nobody to impersonate.

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
    #[error("{0} holds no keys; add `NAME KEY` lines or leave the option out to run without keys on loopback")]
    Empty(PathBuf),
}

/// What a key file holds: client API keys, or node tokens bound to node ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `NAME KEY [admin]` lines.
    Api,
    /// `NODE_ID TOKEN` lines, or one `* TOKEN` line.
    Node,
}

/// The name a node token of a single-node install carries: it may act as any node id.
pub const ANY_NODE: &str = "*";

struct Key {
    name: String,
    digest: [u8; 32],
    admin: bool,
}

/// Who presented a valid key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder<'a> {
    /// The key's name: a client's name, or the node id a node token is bound to.
    pub name: &'a str,
    /// Whether the key carries the `admin` mark.
    pub admin: bool,
}

impl Holder<'_> {
    /// Whether a node token held by this may act as `node_id`.
    pub fn may_act_as(&self, node_id: &str) -> bool {
        self.name == ANY_NODE || self.name == node_id
    }
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
    pub fn load(path: &Path, kind: KeyKind) -> Result<Self, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_kind(&text, path, kind)
    }

    /// An API key file.
    pub fn parse(text: &str, path: &Path) -> Result<Self, KeysError> {
        Self::parse_kind(text, path, KeyKind::Api)
    }

    pub fn parse_kind(text: &str, path: &Path, kind: KeyKind) -> Result<Self, KeysError> {
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
            let (Some(name), Some(key), mark, None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(line_err(match kind {
                    KeyKind::Api => "expected a name, a key and optionally `admin`".into(),
                    KeyKind::Node => "expected a node id (or `*`) and a token".into(),
                }));
            };
            let admin = match (kind, mark) {
                (_, None) => false,
                (KeyKind::Api, Some("admin")) => true,
                (KeyKind::Api, Some(m)) => {
                    return Err(line_err(format!(
                        "the third field may only be `admin`, not {m:?}"
                    )))
                }
                (KeyKind::Node, Some(_)) => {
                    return Err(line_err(
                        "a node token line has two fields, the node id and the token".into(),
                    ))
                }
            };
            match kind {
                KeyKind::Api => {
                    if !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
                    {
                        return Err(line_err(format!(
                            "name {name:?} may hold only letters, digits, - _ . @"
                        )));
                    }
                }
                KeyKind::Node => {
                    if name != ANY_NODE && !llorch_wire::id::valid_id(name) {
                        return Err(line_err(format!(
                            "{name:?} is not a node id (1 to {} of A-Z a-z 0-9 _ . -) nor `*`",
                            llorch_wire::id::MAX_ID_LEN
                        )));
                    }
                    let wildcard = name == ANY_NODE || keys.iter().any(|k| k.name == ANY_NODE);
                    if wildcard && !keys.is_empty() {
                        return Err(line_err(
                            "`*` (any node id) is for a single-node install and must be the only line; name each worker's token by its node id".into(),
                        ));
                    }
                }
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
                admin,
            });
        }
        if keys.is_empty() {
            return Err(KeysError::Empty(path.to_owned()));
        }
        Ok(Self { keys })
    }

    /// Who holds `presented`, if it is one of the keys. Every stored key is compared (in
    /// constant time, on digests of equal length), so the time taken says nothing about which
    /// matched.
    pub fn check(&self, presented: &str) -> Option<Holder<'_>> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.digest.ct_eq(&digest)) {
                found = Some(Holder {
                    name: k.name.as_str(),
                    admin: k.admin,
                });
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
        assert_eq!(
            keys.check("0123456789abcdef0123").map(|h| h.name),
            Some("alice")
        );
        assert_eq!(
            keys.check("fedcba9876543210fedc").map(|h| h.name),
            Some("bob")
        );
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

    #[test]
    fn admin_marks_and_node_bindings() {
        let p = Path::new("keys");
        let keys = ApiKeys::parse(
            "ops 0123456789abcdef0123 admin\napp fedcba9876543210fedc\n",
            p,
        )
        .unwrap();
        assert!(keys.check("0123456789abcdef0123").unwrap().admin);
        assert!(!keys.check("fedcba9876543210fedc").unwrap().admin);
        let err = ApiKeys::parse("ops 0123456789abcdef0123 root\n", p).unwrap_err();
        assert!(err.to_string().contains("`admin`"), "{err}");

        let node = |t: &str| ApiKeys::parse_kind(t, p, KeyKind::Node);
        let tokens = node("w1 0123456789abcdef0123\nw2 fedcba9876543210fedc\n").unwrap();
        let w1 = tokens.check("0123456789abcdef0123").unwrap();
        assert!(w1.may_act_as("w1"));
        assert!(!w1.may_act_as("w2"));
        let any = node("* 0123456789abcdef0123\n").unwrap();
        assert!(any.check("0123456789abcdef0123").unwrap().may_act_as("w2"));
        for bad in [
            "* 0123456789abcdef0123\nw2 fedcba9876543210fedc\n",
            "w1 0123456789abcdef0123\n* fedcba9876543210fedc\n",
            "w1 0123456789abcdef0123 admin\n",
            "a/b 0123456789abcdef0123\n",
        ] {
            let err = node(bad).unwrap_err().to_string();
            assert!(err.starts_with("keys:"), "{bad:?}: {err}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: proptest::prelude::ProptestConfig::default().cases.max(2000), ..proptest::prelude::ProptestConfig::default() })]

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
