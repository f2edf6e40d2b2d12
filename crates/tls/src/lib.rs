//! TLS client configuration shared by the MQTT and PostgreSQL sides.
//!
//! One place decides how a server is verified, so that `mqtts://` and `sslmode` cannot drift:
//! - [`Verify::Full`]: chain to a trusted root and the name we dialled (MQTT always;
//!   `sslmode=verify-full`).
//! - [`Verify::ChainOnly`]: chain to a trusted root, any name (`sslmode=verify-ca`, and
//!   `require` with `sslrootcert`, as libpq does).
//! - [`Verify::EncryptOnly`]: encrypted, the certificate not checked (`sslmode=require`/`prefer`
//!   without a root certificate, as libpq does). Protects against eavesdropping, not against an
//!   active attacker; the docs say so.
//!
//! # Layout
//! - [`client_config`]: builds a rustls `ClientConfig` from PEM files.
//! - [`Roots`]: where trusted roots come from.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;

pub use rustls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{setting}={path}: cannot read: {source}")]
    Read {
        setting: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{setting}={path}: no PEM certificate in the file")]
    NoCertificate {
        setting: &'static str,
        path: PathBuf,
    },
    #[error("{setting}={path}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file")]
    NoKey {
        setting: &'static str,
        path: PathBuf,
    },
    #[error("no trusted root certificates: the system store is empty; set {setting}")]
    NoSystemRoots { setting: &'static str },
    #[error("TLS set-up: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where the trusted roots come from; `setting` names the option for error messages.
#[derive(Debug, Clone)]
pub enum Roots {
    File {
        setting: &'static str,
        path: PathBuf,
    },
    System {
        setting: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    Full,
    ChainOnly,
    EncryptOnly,
}

/// A client certificate and its key.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert_setting: &'static str,
    pub cert: PathBuf,
    pub key_setting: &'static str,
    pub key: PathBuf,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        setting,
        path: path.to_path_buf(),
        source,
    })
}

fn certs(setting: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(setting, path)?;
    // Malformed sections are skipped; a file without any certificate is the error.
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            setting,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn root_store(roots: &Roots) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File { setting, path } => {
            let (added, _) = store.add_parsable_certificates(certs(setting, path)?);
            if added == 0 {
                return Err(TlsError::NoCertificate {
                    setting,
                    path: path.clone(),
                });
            }
        }
        Roots::System { setting } => {
            store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if store.is_empty() {
                return Err(TlsError::NoSystemRoots { setting });
            }
        }
    }
    Ok(store)
}

/// Builds a client configuration. `roots` is ignored for [`Verify::EncryptOnly`].
pub fn client_config(
    verify: Verify,
    roots: &Roots,
    identity: Option<&Identity>,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match verify {
        Verify::Full => builder.with_root_certificates(root_store(roots)?),
        Verify::ChainOnly | Verify::EncryptOnly => {
            let chain = match verify {
                Verify::ChainOnly => Some(
                    WebPkiServerVerifier::builder_with_provider(
                        Arc::new(root_store(roots)?),
                        provider.clone(),
                    )
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?,
                ),
                _ => None,
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient { chain, provider }))
        }
    };
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => {
            let chain = certs(id.cert_setting, &id.cert)?;
            let pem = read(id.key_setting, &id.key)?;
            // The first key of any kind (PKCS#8, PKCS#1, SEC1); certificates before it are skipped.
            let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoKey {
                setting: id.key_setting,
                path: id.key.clone(),
            })?;
            Ok(builder.with_client_auth_cert(chain, key)?)
        }
    }
}

/// Chain checked, name not (libpq's `verify-ca`), or with no `chain` the certificate not checked
/// (libpq's `require` without a root certificate). The handshake signatures are still verified
/// by the provider's algorithms (the ones a chain's verifier uses too), so the session key belongs
/// to the presented cert.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
