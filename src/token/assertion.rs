//! Certificate client assertions (microsoft-reference.md §1.2): a JWT signed with the
//! certificate's RSA key that replaces the client secret.
//!
//! Header `{"alg":"PS256","typ":"JWT","x5t#S256":base64url(SHA-256(cert DER))}` by default, or
//! `{"alg":"RS256","typ":"JWT","x5t":base64url(SHA-1(cert DER))}`; claims `aud` = token URL,
//! `iss` = `sub` = client id, `jti` = random GUID, `nbf` = now, `exp` = now + 600.

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, KeyPair, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::AssertionAlg;
use crate::secret::Secret;

/// How long an assertion is valid (Entra recommends 5–10 minutes).
pub const ASSERTION_LIFETIME: u64 = 600;

/// Why a certificate credential could not be loaded or used.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AssertionError {
    /// The certificate file holds no PEM certificate.
    #[error("no PEM certificate (-----BEGIN CERTIFICATE-----) found: {0}")]
    CertPem(String),
    /// The certificate is not valid X.509.
    #[error("the certificate is not valid X.509: {0}")]
    CertDer(String),
    /// The key holds no PEM private key.
    #[error(
        "no PEM private key found (expected -----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----)"
    )]
    KeyPem,
    /// The key is not an RSA key aws-lc-rs accepts.
    #[error(
        "the private key is not a usable RSA key (Entra client assertions need RSA, 2048 bits or more): {0}"
    )]
    KeyRejected(String),
    /// The key does not belong to the certificate.
    #[error("the private key does not belong to the certificate (their public keys differ)")]
    KeyMismatch,
    /// Signing failed (should not happen with a loaded key).
    #[error("signing the client assertion failed")]
    Sign,
}

/// A loaded certificate + RSA key, ready to sign assertions.
pub struct CertCredential {
    key: RsaKeyPair,
    /// base64url(SHA-256(cert DER)), the `x5t#S256` header.
    pub x5t_s256: String,
    /// base64url(SHA-1(cert DER)), the `x5t` header.
    pub x5t: String,
    /// The certificate's notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// The certificate's subject, for messages.
    pub subject: String,
    /// SHA-1 thumbprint in upper-case hex, as the Entra admin centre shows it.
    pub thumbprint_hex: String,
}

impl std::fmt::Debug for CertCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertCredential")
            .field("subject", &self.subject)
            .field("thumbprint", &self.thumbprint_hex)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Parse the first PEM certificate: its DER, notAfter (epoch seconds) and subject.
pub fn parse_cert(pem: &[u8]) -> Result<(Vec<u8>, i64, String), AssertionError> {
    let der =
        CertificateDer::from_pem_slice(pem).map_err(|e| AssertionError::CertPem(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| AssertionError::CertDer(e.to_string()))?;
    let not_after = cert.validity().not_after.timestamp();
    let subject = cert.subject().to_string();
    Ok((der.as_ref().to_vec(), not_after, subject))
}

impl CertCredential {
    /// Load a PEM certificate and its PEM private key (PKCS#8 or PKCS#1 RSA).
    pub fn load(cert_pem: &[u8], key_pem: &Secret<String>) -> Result<Self, AssertionError> {
        let (der, not_after, subject) = parse_cert(cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.expose().as_bytes())
            .map_err(|_| AssertionError::KeyPem)?;
        let key = match &key {
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            PrivateKeyDer::Sec1(_) => {
                return Err(AssertionError::KeyRejected(
                    "an EC (SEC1) key; use an RSA key".into(),
                ));
            }
            _ => return Err(AssertionError::KeyPem),
        }
        .map_err(|e| AssertionError::KeyRejected(e.to_string()))?;
        // Catch the classic mix-up (key of another certificate) here, not as AADSTS700027.
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| AssertionError::CertDer(e.to_string()))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key().as_ref() {
            return Err(AssertionError::KeyMismatch);
        }
        let sha1 = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &der);
        let sha256 = digest::digest(&digest::SHA256, &der);
        Ok(CertCredential {
            key,
            x5t_s256: B64URL.encode(sha256.as_ref()),
            x5t: B64URL.encode(sha1.as_ref()),
            not_after,
            subject,
            thumbprint_hex: sha1.as_ref().iter().map(|b| format!("{b:02X}")).collect(),
        })
    }

    /// A signed client assertion for `client_id` at `token_url`, valid from `now`.
    pub fn sign(
        &self,
        alg: AssertionAlg,
        client_id: &str,
        token_url: &str,
        now: u64,
    ) -> Result<Secret<String>, AssertionError> {
        let header = match alg {
            AssertionAlg::Ps256 => {
                serde_json::json!({"alg": "PS256", "typ": "JWT", "x5t#S256": self.x5t_s256})
            }
            AssertionAlg::Rs256 => {
                serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t": self.x5t})
            }
        };
        let claims = serde_json::json!({
            "aud": token_url,
            "iss": client_id,
            "sub": client_id,
            "jti": random_guid(),
            "nbf": now,
            "exp": now + ASSERTION_LIFETIME,
        });
        let signing_input = format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        );
        let padding: &'static dyn signature::RsaEncoding = match alg {
            AssertionAlg::Ps256 => &signature::RSA_PSS_SHA256,
            AssertionAlg::Rs256 => &signature::RSA_PKCS1_SHA256,
        };
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(
                padding,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| AssertionError::Sign)?;
        Ok(Secret::new(format!(
            "{signing_input}.{}",
            B64URL.encode(&sig)
        )))
    }
}

/// A random (version 4) GUID, as Entra wants for `jti`.
pub fn random_guid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::UnparsedPublicKey;

    fn cert_and_key() -> (String, String) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec!["postern-test".into()]).unwrap();
        let cert = params.self_signed(&kp).unwrap();
        (cert.pem(), kp.serialize_pem())
    }

    fn split(jwt: &str) -> (serde_json::Value, serde_json::Value, Vec<u8>, String) {
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let h = serde_json::from_slice(&B64URL.decode(parts[0]).unwrap()).unwrap();
        let c = serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
        let s = B64URL.decode(parts[2]).unwrap();
        (h, c, s, format!("{}.{}", parts[0], parts[1]))
    }

    #[test]
    fn ps256_and_rs256_verify_with_the_certificate_public_key() {
        let (cert_pem, key_pem) = cert_and_key();
        let cred = CertCredential::load(cert_pem.as_bytes(), &Secret::new(key_pem)).unwrap();
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        let spki = x509.public_key().subject_public_key.data.to_vec();
        let url = "https://login.microsoftonline.com/t/oauth2/v2.0/token";
        for (alg, verify, hdr) in [
            (
                AssertionAlg::Ps256,
                &signature::RSA_PSS_2048_8192_SHA256,
                "x5t#S256",
            ),
            (
                AssertionAlg::Rs256,
                &signature::RSA_PKCS1_2048_8192_SHA256,
                "x5t",
            ),
        ] {
            let jwt = cred.sign(alg, "client-1", url, 1_700_000_000).unwrap();
            let (h, c, sig, input) = split(jwt.expose());
            UnparsedPublicKey::new(verify, &spki)
                .verify(input.as_bytes(), &sig)
                .unwrap();
            assert_eq!(h["typ"], "JWT");
            let expected = if hdr == "x5t" {
                B64URL.encode(digest::digest(
                    &digest::SHA1_FOR_LEGACY_USE_ONLY,
                    der.as_ref(),
                ))
            } else {
                B64URL.encode(digest::digest(&digest::SHA256, der.as_ref()))
            };
            assert_eq!(h[hdr], expected.as_str());
            assert_eq!(c["aud"], url);
            assert_eq!(c["iss"], "client-1");
            assert_eq!(c["sub"], "client-1");
            assert_eq!(c["nbf"], 1_700_000_000u64);
            assert_eq!(c["exp"], 1_700_000_600u64);
            assert_eq!(c["jti"].as_str().unwrap().len(), 36);
        }
        // A PS256 signature does not verify as RS256.
        let jwt = cred.sign(AssertionAlg::Ps256, "c", url, 0).unwrap();
        let (_, _, sig, input) = split(jwt.expose());
        assert!(
            UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, &spki)
                .verify(input.as_bytes(), &sig)
                .is_err()
        );
    }

    #[test]
    fn documented_x5t_example_encoding() {
        // microsoft-reference.md §1.2: hex 84E05C1D...5534 -> hOBcHZi846VCHSJbFAs26Go9VTQ.
        let b = B64URL.decode("hOBcHZi846VCHSJbFAs26Go9VTQ").unwrap();
        assert_eq!(b.len(), 20);
        assert_eq!(b[0], 0x84);
        assert_eq!(b[19], 0x34);
    }

    #[test]
    fn key_of_another_certificate_is_refused() {
        let (cert_pem, _) = cert_and_key();
        let (_, other_key) = cert_and_key();
        let e = CertCredential::load(cert_pem.as_bytes(), &Secret::new(other_key)).unwrap_err();
        assert_eq!(e, AssertionError::KeyMismatch);
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        assert!(matches!(
            CertCredential::load(b"nope", &Secret::new("nope".into())),
            Err(AssertionError::CertPem(_))
        ));
        let (cert_pem, _) = cert_and_key();
        assert_eq!(
            CertCredential::load(cert_pem.as_bytes(), &Secret::new("x".into())).unwrap_err(),
            AssertionError::KeyPem
        );
    }

    #[test]
    fn guids_are_v4_and_unique() {
        let a = random_guid();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, random_guid());
    }
}
