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
    #[error("{path} can be read by other users (mode {mode:o}); it holds secrets: chmod 600 it (or pass it as a systemd credential)")]
    Exposed { path: PathBuf, mode: u32 },
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

#[derive(Clone)]
struct Key {
    name: String,
    digest: [u8; 32],
    admin: bool,
    grant: NodeGrant,
}

/// What a node token may register, from its line's `models=` and `slots=` fields: None is no
/// limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeGrant {
    /// The model ids its pools may serve.
    pub models: Option<Vec<String>>,
    /// The most slots its pools may hold together.
    pub max_slots: Option<u32>,
}

impl NodeGrant {
    /// Why `pools` (pool id, model id, slots) exceed the grant, naming the field; None when
    /// they do not.
    pub fn refuses(&self, pools: &[(&str, &str, u32)]) -> Option<(String, String)> {
        if let Some(models) = &self.models {
            for (i, (pool, model, _)) in pools.iter().enumerate() {
                if !models.iter().any(|m| m == model) {
                    return Some((
                        format!("pools[{i}].model_id"),
                        format!("pool {pool:?} serves model {model:?}, which this node's token does not allow (its line in node-tokens lists models={})", models.join(",")),
                    ));
                }
            }
        }
        if let Some(max) = self.max_slots {
            let total: u64 = pools.iter().map(|(_, _, s)| u64::from(*s)).sum();
            if total > u64::from(max) {
                return Some((
                    "pools".into(),
                    format!("the pools hold {total} slots, more than the {max} this node's token allows (slots= in node-tokens)"),
                ));
            }
        }
        None
    }
}

/// A node token line's fields after the token: `models=ID[,ID…]` and `slots=N`, each at most
/// once. The error never quotes a field (a swapped line would put the token there).
fn node_grant(fields: &[&str]) -> Result<NodeGrant, String> {
    let mut grant = NodeGrant::default();
    for field in fields {
        match field.split_once('=') {
            Some(("models", list)) if grant.models.is_none() => {
                let models: Vec<String> = list.split(',').map(str::to_string).collect();
                if models.iter().any(|m| !llorch_wire::id::valid_model_id(m)) {
                    return Err("models= takes model ids separated by commas".into());
                }
                grant.models = Some(models);
            }
            Some(("slots", n)) if grant.max_slots.is_none() => {
                grant.max_slots = Some(
                    n.parse::<u32>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or("slots= takes a number of slots, at least 1")?,
                );
            }
            _ => {
                return Err(
                    "after the node id and the token, a line may give models=ID,ID and slots=N, each once".into(),
                )
            }
        }
    }
    Ok(grant)
}

/// Reads a file of secrets, refusing one that other users can read: a key file left at mode
/// 0644 gives every local user every key.
fn read_secret_file(path: &Path) -> Result<String, KeysError> {
    let read = |source| KeysError::Read {
        path: path.to_owned(),
        source,
    };
    if let Some(mode) = llorch_os::fs::exposed_secret(path).map_err(read)? {
        return Err(KeysError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    std::fs::read_to_string(path).map_err(read)
}

/// Who presented a valid key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder<'a> {
    /// The key's name: a client's name, or the node id a node token is bound to.
    pub name: &'a str,
    /// Whether the key carries the `admin` mark.
    pub admin: bool,
    /// What a node token may register.
    pub grant: &'a NodeGrant,
}

impl Holder<'_> {
    /// Whether a node token held by this may act as `node_id`.
    pub fn may_act_as(&self, node_id: &str) -> bool {
        self.name == ANY_NODE || self.name == node_id
    }
}

/// A set of named API keys.
#[derive(Clone)]
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
        let text = read_secret_file(path)?;
        Self::parse_kind(&text, path, kind)
    }

    /// The operator's token file (`--admin-token-file`): its first line that is neither empty
    /// nor a `#` comment is the token, which acts as a key named `operator` marked `admin`.
    pub fn load_admin_token(path: &Path) -> Result<Self, KeysError> {
        Self::parse_admin_token(&read_secret_file(path)?, path)
    }

    /// An operator's token file's text (see [`ApiKeys::load_admin_token`]).
    pub fn parse_admin_token(text: &str, path: &Path) -> Result<Self, KeysError> {
        let Some((i, token)) = text
            .lines()
            .map(str::trim)
            .enumerate()
            .find(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        else {
            return Err(KeysError::Empty(path.to_owned()));
        };
        if token.len() < MIN_KEY_LEN || token.contains(char::is_whitespace) {
            return Err(KeysError::Line {
                path: path.to_owned(),
                line: i + 1,
                message: format!(
                    "the admin token must be one word of at least {MIN_KEY_LEN} characters"
                ),
            });
        }
        Ok(Self {
            keys: vec![Key {
                // Not a name an API key file can hold (no parentheses there): the operator's
                // tasks, fair share and cache scope are never a key's.
                name: "(operator)".into(),
                digest: Sha256::digest(token.as_bytes()).into(),
                admin: true,
                grant: NodeGrant::default(),
            }],
        })
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
            let (Some(name), Some(key)) = (parts.next(), parts.next()) else {
                return Err(line_err(match kind {
                    KeyKind::Api => "expected a name, a key and optionally `admin`".into(),
                    KeyKind::Node => "expected a node id (or `*`) and a token".into(),
                }));
            };
            let rest: Vec<&str> = parts.collect();
            let mut grant = NodeGrant::default();
            let admin = match (kind, rest.as_slice()) {
                (_, []) => false,
                (KeyKind::Api, ["admin"]) => true,
                (KeyKind::Api, _) => {
                    return Err(line_err("the third field may only be `admin`".into()))
                }
                (KeyKind::Node, fields) => {
                    grant = node_grant(fields).map_err(line_err)?;
                    false
                }
            };
            match kind {
                KeyKind::Api => {
                    if !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
                    {
                        return Err(line_err(
                            "the name (first field) may hold only letters, digits, - _ . @".into(),
                        ));
                    }
                }
                KeyKind::Node => {
                    if name != ANY_NODE && !llorch_wire::id::valid_id(name) {
                        return Err(line_err(format!(
                            "the first field is not a node id (1 to {} of A-Z a-z 0-9 _ . -) nor `*`",
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
            // Neither field is ever echoed: with the columns swapped, the "name" is the key,
            // and this message goes to the journal.
            if key.len() < MIN_KEY_LEN {
                return Err(line_err(format!(
                    "the key (second field) is shorter than {MIN_KEY_LEN} characters; were the columns swapped?"
                )));
            }
            if keys.iter().any(|k| k.name == name) {
                return Err(line_err(
                    "the name (first field) appears on an earlier line too".into(),
                ));
            }
            keys.push(Key {
                name: name.to_string(),
                digest: Sha256::digest(key.as_bytes()).into(),
                admin,
                grant,
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
                    grant: &k.grant,
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

    #[test]
    fn node_token_lines_may_limit_models_and_slots() {
        let p = Path::new("keys");
        let node = |t: &str| ApiKeys::parse_kind(t, p, KeyKind::Node);
        let tokens = node("w1 0123456789abcdef0123 models=m1,q:7b slots=8\n").unwrap();
        let grant = tokens.check("0123456789abcdef0123").unwrap().grant.clone();
        assert_eq!(
            grant.models.as_deref(),
            Some(&["m1".to_string(), "q:7b".into()][..])
        );
        assert_eq!(grant.max_slots, Some(8));
        assert_eq!(grant.refuses(&[("a", "m1", 4), ("b", "q:7b", 4)]), None);
        let (field, why) = grant.refuses(&[("a", "m1", 4), ("b", "other", 1)]).unwrap();
        assert_eq!(field, "pools[1].model_id");
        assert!(why.contains("\"other\""), "{why}");
        assert_eq!(grant.refuses(&[("a", "m1", 9)]).unwrap().0, "pools");
        // No fields: no limits.
        let free = node("w1 0123456789abcdef0123\n").unwrap();
        assert_eq!(
            *free.check("0123456789abcdef0123").unwrap().grant,
            NodeGrant::default()
        );
        for bad in [
            "w1 0123456789abcdef0123 slots=0\n",
            "w1 0123456789abcdef0123 slots=8 slots=9\n",
            "w1 0123456789abcdef0123 models=a/b\n",
            "w1 0123456789abcdef0123 gpus=2\n",
        ] {
            let err = node(bad).unwrap_err().to_string();
            assert!(
                err.starts_with("keys:1:") && !err.contains("0123456789abcdef0123"),
                "{err}"
            );
        }
    }

    #[test]
    fn key_files_readable_by_others_are_refused_and_no_message_holds_a_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "alice 0123456789abcdef0123\n").unwrap();
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = ApiKeys::load(&path, KeyKind::Api).unwrap_err().to_string();
            assert!(err.contains("chmod 600"), "{mode:o}: {err}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        ApiKeys::load(&path, KeyKind::Api).unwrap();
        // Columns swapped, a bad mark, a duplicate, a short key: the key text never shows.
        let secret = "s3cr3t-0123456789abcdef";
        for text in [
            format!("{secret} alice\n"),
            format!("alice {secret} root\n"),
            format!("alice {secret}\nalice {secret}\n"),
            format!("{secret}/x {secret}\n"),
        ] {
            let err = ApiKeys::parse(&text, Path::new("keys"))
                .unwrap_err()
                .to_string();
            assert!(!err.contains("s3cr3t"), "{err}");
            let err = ApiKeys::parse_kind(&text, Path::new("keys"), KeyKind::Node)
                .unwrap_err()
                .to_string();
            assert!(!err.contains("s3cr3t"), "{err}");
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
