//! Server TLS: a `rustls::ServerConfig` from a listener's PEM certificate chain and key
//! (parsed with rustls-pki-types' `PemObject`), with the aws-lc-rs provider. TLS 1.2 and 1.3
//! by default; 1.3 only when `tls_min_version` says so.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::version::{TLS12, TLS13};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{TlsFiles, TlsMinVersion};

/// Why a listener's TLS setup failed; each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or parsed.
    #[error(
        "TLS certificate {path}: {source} (expected a PEM file with \"BEGIN CERTIFICATE\" blocks)"
    )]
    Cert {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error(
        "TLS certificate {path}: no certificate found (expected a PEM file with \"BEGIN CERTIFICATE\" blocks)"
    )]
    NoCert {
        /// The file.
        path: PathBuf,
    },
    /// The key file could not be read or parsed.
    #[error("TLS key {path}: {source} (expected a PEM private key: PKCS#8, PKCS#1 or SEC1)")]
    Key {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// rustls refused the pair (key does not match the certificate, unsupported key type...).
    #[error("TLS certificate {cert} with key {key}: {source}")]
    Config {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// The rustls error.
        source: rustls::Error,
    },
}

/// Build the server config for `files`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_err = |source| TlsError::Cert {
        path: files.cert.clone(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(cert_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(cert_err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            path: files.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Key {
        path: files.key.clone(),
        source,
    })?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = match files.min_version {
        TlsMinVersion::Tls12 => &[&TLS13, &TLS12],
        TlsMinVersion::Tls13 => &[&TLS13],
    };
    let config_err = |source| TlsError::Config {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(config_err)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(config_err)?;
    Ok(Arc::new(config))
}

/// A TLS acceptor for `files`.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    server_config(files).map(TlsAcceptor::from)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed certificate for `localhost` written to a temp dir.
    pub(crate) fn self_signed() -> (tempfile::TempDir, TlsFiles, CertificateDer<'static>) {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let files = TlsFiles {
            cert,
            key,
            min_version: TlsMinVersion::Tls12,
        };
        (dir, files, ck.cert.der().clone())
    }

    #[test]
    fn loads_pem_and_reports_bad_files() {
        let (dir, files, _) = self_signed();
        assert!(acceptor(&files).is_ok());
        let mut v13 = files.clone();
        v13.min_version = TlsMinVersion::Tls13;
        assert!(server_config(&v13).is_ok());

        let mut missing = files.clone();
        missing.cert = dir.path().join("nope.pem");
        let e = server_config(&missing).unwrap_err().to_string();
        assert!(e.contains("nope.pem"), "{e}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here\n").unwrap();
        let mut no_cert = files.clone();
        no_cert.cert = empty.clone();
        assert!(matches!(
            server_config(&no_cert),
            Err(TlsError::NoCert { .. })
        ));
        let mut no_key = files.clone();
        no_key.key = empty;
        assert!(matches!(server_config(&no_key), Err(TlsError::Key { .. })));

        // A key that does not belong to the certificate.
        let (_d2, other, _) = self_signed();
        let mut mismatch = files.clone();
        mismatch.key = other.key;
        assert!(matches!(
            server_config(&mismatch),
            Err(TlsError::Config { .. })
        ));
    }
}
