//! A throwaway certificate authority for TLS tests: a CA, and server certificates it signs for
//! the names and addresses a test dials, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A CA whose certificate is at [`Ca::cert`].
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert: PathBuf,
    dir: PathBuf,
}

/// A server certificate and its key, as PEM files.
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    /// A new CA named `name`, its certificate written to `dir/<name>.ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let key = KeyPair::generate().expect("generate the CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("self-sign the CA");
        let path = dir.join(format!("{name}.ca.pem"));
        std::fs::write(&path, cert.pem()).expect("write the CA certificate");
        Self {
            issuer: Issuer::new(params, key),
            cert: path,
            dir: dir.to_owned(),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses), written as
    /// `dir/<file>.pem` and `dir/<file>.key`.
    pub fn server(&self, file: &str, names: &[&str]) -> ServerCert {
        let key = KeyPair::generate().expect("generate a server key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("server params");
        params.distinguished_name.push(DnType::CommonName, file);
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign a server certificate");
        let out = ServerCert {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&out.cert, cert.pem()).expect("write the certificate");
        std::fs::write(&out.key, key.serialize_pem()).expect("write the key");
        out
    }
}
