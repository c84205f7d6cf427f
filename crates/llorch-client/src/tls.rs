//! Which certificate authorities an `https://` client trusts.
//!
//! By default the system's store (Debian's `ca-certificates`, read once per process); a
//! deployment with its own CA gives its PEM file instead (orchestratord's `--node-ca`,
//! pool-managerd's `node.control_plane_ca`), and then only that CA is trusted. Certificates are
//! always verified: there is no switch that accepts any certificate.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::ClientError;

/// The trust roots of `https://` clients.
#[derive(Clone)]
pub struct TlsRoots(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for TlsRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsRoots")
    }
}

impl TlsRoots {
    /// The system's CA store. A store that cannot be read is empty: every `https://` request
    /// then fails verification, and says so, rather than trusting anything.
    pub fn system() -> Self {
        static SYSTEM: OnceLock<TlsRoots> = OnceLock::new();
        SYSTEM
            .get_or_init(|| {
                let mut roots = RootCertStore::empty();
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                Self::from_store(roots)
            })
            .clone()
    }

    /// Only the CA certificates in the PEM file at `path`.
    pub fn from_pem_file(path: &Path) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::Tls {
            path: path.to_owned(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("holds no PEM certificate".into()));
        }
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
        }
        Ok(Self::from_store(roots))
    }

    fn from_store(roots: RootCertStore) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self(Arc::new(config))
    }

    pub(crate) fn config(&self) -> rustls::ClientConfig {
        (*self.0).clone()
    }
}

/// Whether `address` is `http://` to a host other than this one (loopback addresses and
/// `localhost` stay here; any other name or address may be across a network).
pub fn leaves_host_in_clear(address: &str) -> bool {
    let Some(rest) = address.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

/// Whether a node address names the machine it is read on: a `unix:` socket, or an
/// `http(s)://` URL of a loopback host.
pub fn names_this_host(address: &str) -> bool {
    if address.starts_with("unix:") {
        return true;
    }
    let Some(rest) = address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
    else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::{leaves_host_in_clear, names_this_host};

    #[test]
    fn addresses_of_this_host() {
        for here in [
            "unix:/run/llama-orch/pool-managerd.sock",
            "http://127.0.0.1:9000",
            "https://localhost:9443/",
            "http://[::1]:1",
        ] {
            assert!(names_this_host(here), "{here}");
        }
        for there in [
            "http://10.0.0.2:9000",
            "https://w2.example:9443",
            "ftp://127.0.0.1",
        ] {
            assert!(!names_this_host(there), "{there}");
        }
    }

    #[test]
    fn only_plain_http_to_another_host_is_in_the_clear() {
        for here in [
            "http://127.0.0.1:9200",
            "http://127.8.0.1:1",
            "http://[::1]:9200",
            "http://localhost:9200",
            "https://10.0.0.2:9200",
            "https://worker-1.lan:9200",
            "unix:/run/llama-orch/pool-managerd.sock",
        ] {
            assert!(!leaves_host_in_clear(here), "{here}");
        }
        for away in [
            "http://10.0.0.2:9200",
            "http://worker-1.lan:9200",
            "http://[fd00::2]:9200",
            "http://0.0.0.0:9200",
            "http://127.0.0.1.evil.example:1",
        ] {
            assert!(leaves_host_in_clear(away), "{away}");
        }
    }
}
