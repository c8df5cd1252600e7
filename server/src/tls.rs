//! Mutual TLS with certificates reloaded from disk.
//!
//! tonic's built-in TLS config is fixed at startup; here every new connection is accepted
//! (by [`crate::listen`]) with the *current* rustls config, which a watcher rebuilds when the CA, certificate or
//! key files change. Established connections keep the session they authenticated with, so a
//! rotation never drops a stream.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moat_proto::Identity;
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}: no certificate in PEM file")]
    NoCert(PathBuf),
    #[error("{0}: no private key in PEM file")]
    NoKey(PathBuf),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// PEM files: the CA that signs every Moat certificate, and this server's certificate.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

pub fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(Error::NoCert(path.to_path_buf()));
    }
    Ok(certs)
}

pub fn key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, Error> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| Error::NoKey(path.to_path_buf()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(files: &TlsFiles, pems: &[Vec<u8>; 3], client_auth: bool) -> Result<ServerConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&files.ca, &pems[0])? {
        roots.add(c)?;
    }
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = if client_auth {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build()?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut cfg =
        builder.with_single_cert(certs(&files.cert, &pems[1])?, key(&files.key, &pems[2])?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The current server TLS config, rebuilt when its files change.
pub struct Reloading {
    files: TlsFiles,
    client_auth: bool,
    current: RwLock<Arc<ServerConfig>>,
    loaded: Mutex<[Vec<u8>; 3]>,
}

impl Reloading {
    /// Mutual TLS: clients must present a certificate from the CA.
    pub fn new(files: TlsFiles) -> Result<Arc<Self>, Error> {
        Self::with_client_auth(files, true)
    }

    /// Server authentication only, for bootstrap, where a token authenticates the client.
    pub fn server_only(files: TlsFiles) -> Result<Arc<Self>, Error> {
        Self::with_client_auth(files, false)
    }

    fn with_client_auth(files: TlsFiles, client_auth: bool) -> Result<Arc<Self>, Error> {
        let pems = [read(&files.ca)?, read(&files.cert)?, read(&files.key)?];
        let cfg = build(&files, &pems, client_auth)?;
        Ok(Arc::new(Self {
            files,
            client_auth,
            current: RwLock::new(Arc::new(cfg)),
            loaded: Mutex::new(pems),
        }))
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls lock").clone()
    }

    /// Rebuilds the config if any file changed. A broken new set of files is reported and
    /// the old config stays in use.
    pub fn reload_if_changed(&self) -> Result<bool, Error> {
        let pems = [
            read(&self.files.ca)?,
            read(&self.files.cert)?,
            read(&self.files.key)?,
        ];
        if *self.loaded.lock().expect("tls lock") == pems {
            return Ok(false);
        }
        let cfg = build(&self.files, &pems, self.client_auth)?;
        *self.current.write().expect("tls lock") = Arc::new(cfg);
        *self.loaded.lock().expect("tls lock") = pems;
        Ok(true)
    }

    /// Checks the files every `every` (cheap: three small reads).
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match me.reload_if_changed() {
                    Ok(true) => info!(cert = %me.files.cert.display(), "TLS certificates reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        warn!(error = %e, "TLS files changed but cannot be loaded; keeping the previous ones")
                    }
                }
            }
        });
    }
}

/// The Moat identity in a peer certificate and when the certificate expires.
pub fn identity_of(der: &[u8]) -> Option<(Identity, SystemTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let not_after = UNIX_EPOCH
        + Duration::from_secs(u64::try_from(cert.validity().not_after.timestamp()).ok()?);
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Identity::from_uri(u),
        _ => None,
    });
    let id = ids.next()?;
    // A certificate naming two identities is ambiguous: refuse it.
    if ids.next().is_some() {
        return None;
    }
    Some((id, not_after))
}
