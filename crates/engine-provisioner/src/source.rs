//! Where a model comes from: a local file (`file:` URL or plain path) or an `http(s)://` URL.

use std::path::PathBuf;

use crate::ProvisionError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Http(String),
}

impl Source {
    pub fn parse(s: &str) -> Result<Self, ProvisionError> {
        if s.is_empty() {
            return Err(ProvisionError::Usage(
                "the model source is empty; give a path, a file: URL or an http(s):// URL".into(),
            ));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            return Ok(Source::Http(s.to_string()));
        }
        if let Some(rest) = s.strip_prefix("file://") {
            return Ok(Source::File(PathBuf::from(rest)));
        }
        if let Some(rest) = s.strip_prefix("file:") {
            return Ok(Source::File(PathBuf::from(rest)));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(ProvisionError::Usage(format!(
                "model source {s:?} uses the scheme {scheme:?}; use a path, file:, http:// or https://"
            )));
        }
        Ok(Source::File(PathBuf::from(s)))
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Http(u) => f.write_str(u),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            Source::parse("/m/a.gguf").unwrap(),
            Source::File("/m/a.gguf".into())
        );
        assert_eq!(
            Source::parse("file:/m/a.gguf").unwrap(),
            Source::File("/m/a.gguf".into())
        );
        assert_eq!(
            Source::parse("file:///m/a.gguf").unwrap(),
            Source::File("/m/a.gguf".into())
        );
        assert_eq!(
            Source::parse("https://h/a.gguf").unwrap(),
            Source::Http("https://h/a.gguf".into())
        );
        assert!(Source::parse("s3://b/a.gguf")
            .unwrap_err()
            .to_string()
            .contains("s3"));
        assert!(Source::parse("").is_err());
    }
}
