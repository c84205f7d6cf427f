//! The node configuration file (TOML): which node this is, where the control plane is, where the
//! node API listens, and the pools to run. Everything is parsed and validated before a socket is
//! bound; an error names the file, the key and what to do.
//!
//! This module owns parsing and validation only; the paths it derives (`RuntimeLayout`) are used
//! by the launcher and the handoff watcher.
//!
//! Files, by what they own (every item is re-exported here, so callers name
//! `config::PoolConfig`, never a file):
//! - `schema.rs`: the file's serde types and the limits of their values.
//! - `validate.rs`: the checks, one function per section, and the [`Checked`] configuration
//!   they derive (listen address, advertised address, TLS files, token).
//! - `reload.rs`: which `[node]` keys a reload cannot apply ([`node_changes`]).
//! - `layout.rs`: the files under the runtime directory ([`RuntimeLayout`]).

use std::path::{Path, PathBuf};

mod layout;
mod reload;
mod schema;
mod validate;

pub use layout::RuntimeLayout;
pub use reload::node_changes;
pub use schema::{
    Config, DeviceList, Gpu, LauncherKind, ModelConfig, NodeConfig, PoolConfig,
    DEFAULT_KEEP_ALIVE_SECS, MAX_ID_LEN, MAX_SLOTS, MIN_CTX, MIN_RESIDENT_SECS,
};
pub use validate::{valid_id, Checked, Listen, Secret};

/// A configuration that cannot be used, with the file and key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The key at fault, when one is.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Checked, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// The local model files (a path or a `file:` URL) of the pools that are not readable
/// files, one line each naming the pool's key and what to do; what `--check-config` adds to
/// the parse, which a running node leaves to each pool (its error, its retries).
pub fn missing_local_sources(config: &Checked) -> Vec<String> {
    let mut out = Vec::new();
    for (i, pool) in config.pools().iter().enumerate() {
        let source = &pool.model.source;
        if source.starts_with("http://") || source.starts_with("https://") {
            continue;
        }
        let file = source
            .strip_prefix("file://")
            .or_else(|| source.strip_prefix("file:"))
            .unwrap_or(source);
        let problem = match std::fs::metadata(file) {
            Ok(m) if m.is_file() => continue,
            Ok(_) => "is not a regular file".to_string(),
            Err(e) => e.to_string(),
        };
        out.push(format!(
            "pools[{i}].model.source (pool {:?}): {file}: {problem}; put the GGUF file there, or point source at it",
            pool.id
        ));
    }
    out
}

/// Parses and validates configuration text; `path` names the file in errors.
pub fn parse(path: &Path, text: &str) -> Result<Checked, ConfigError> {
    let value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let config: Config =
        serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
            let key = e.path().to_string();
            // toml's value deserializer appends "in `table`" lines; the key says that already.
            let inner = e.into_inner().to_string();
            let inner = inner
                .lines()
                .next()
                .unwrap_or_default()
                .trim_end()
                .to_string();
            ConfigError::Invalid {
                path: path.to_owned(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message: format!("{inner} (see crates/pool-managerd/examples/node.toml)"),
            }
        })?;
    validate::validate(path, config)
}

/// What the tests of every file here share: the shipped example and parsing helpers.
#[cfg(test)]
mod testing {
    use std::path::Path;

    use super::{parse, Checked, ConfigError};

    pub(super) const EXAMPLE: &str = include_str!("../../examples/node.toml");

    pub(super) fn parse_str(text: &str) -> Result<Checked, ConfigError> {
        parse(Path::new("node.toml"), text)
    }

    pub(super) fn key_of(text: &str) -> String {
        let err = parse_str(text).unwrap_err();
        assert!(err.to_string().starts_with("node.toml: "), "{err}");
        err.key()
            .unwrap_or_else(|| panic!("no key in {err}"))
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{key_of, parse_str, EXAMPLE};
    use super::*;

    #[test]
    fn the_shipped_example_parses() {
        let c = parse_str(EXAMPLE).unwrap();
        assert_eq!(c.node().id, "home");
        assert_eq!(c.node().heartbeat_secs, 5);
        assert_eq!(
            c.listen,
            Listen::Unix("/run/llama-orch/pool-managerd.sock".into())
        );
        assert_eq!(c.advertise, "unix:/run/llama-orch/pool-managerd.sock");
        assert_eq!(c.pools().len(), 1);
        let p = &c.pools()[0];
        assert_eq!((p.id.as_str(), p.slots, p.ctx), ("default", 4, 2048));
        assert_eq!(p.model.id, "smollm2-135m");
        assert_eq!(p.gpu_layers(), 0);
        assert_eq!(
            c.layout().handoff_file("default"),
            PathBuf::from("/run/llama-orch/handoff/default/default.json")
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = EXAMPLE.replace("slots = 4", "slots = 4\nslotz = 3");
        assert_eq!(key_of(&text), "pools[0].slotz");
        let err = parse_str(&text).unwrap_err().to_string();
        assert!(
            err.contains("unknown field `slotz`") && !err.contains('\n'),
            "{err}"
        );
        let text = EXAMPLE.replace("[node]", "[node]\ncolour = \"blue\"");
        assert_eq!(key_of(&text), "node.colour");
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let err = parse_str("[node\nid = 1").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }));
        assert!(err.to_string().starts_with("node.toml: "), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: proptest::prelude::ProptestConfig::default().cases.max(1000), ..proptest::prelude::ProptestConfig::default() })]

        /// The shipped example with a span of it replaced by anything: parsed, or refused
        /// with the file's name, never a panic.
        #[test]
        fn any_node_toml_parses_or_names_the_file(
            at in proptest::prelude::any::<proptest::sample::Index>(),
            len in 0usize..40,
            with in ".{0,40}",
        ) {
            let mut text = EXAMPLE.to_string();
            let mut start = at.index(text.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let mut end = (start + len).min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.replace_range(start..end, &with);
            if let Err(e) = parse_str(&text) {
                proptest::prop_assert!(e.to_string().starts_with("node.toml"), "{}", e);
            }
        }
    }
}
