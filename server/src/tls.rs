//! Mutual TLS with certificates reloaded from disk.
//!
//! tonic's built-in TLS config is fixed at startup; here every new connection is accepted
//! (by [`crate::listen`]) with the *current* rustls config, which a watcher rebuilds when the CA, certificate or
//! key files change. Established connections keep the session they authenticated with, so a
//! rotation never drops a stream.
//!
//! Client certificates may come from two CAs: the main CA (`--tls-ca`, every identity) and
//! the node CA (`--tls-node-ca`, what bootstrap signs with). The handshake accepts either;
//! [`Reloading::anchor`] says which one a verified chain ends at, and a chain that only the
//! node CA vouches for is good for a node identity on the sync API and nothing else — so
//! the key the server holds for bootstrap can never mint an admin.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moat_proto::Identity;
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
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
    /// The node CA: its certificates are good for node identities on the sync API only.
    pub node_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut p = vec![self.ca.as_path(), self.cert.as_path(), self.key.as_path()];
        p.extend(self.node_ca.as_deref());
        p
    }
}

/// Which CA a verified client certificate chains to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anchor {
    /// The main CA (`--tls-ca`): any identity it names.
    Main,
    /// Only the node CA (`--tls-node-ca`): a node identity on the sync API, nothing else.
    NodeCa,
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

/// A server config, and (with a node CA) a verifier that trusts the main CA alone.
struct Built {
    config: Arc<ServerConfig>,
    main_only: Option<Arc<dyn ClientCertVerifier>>,
}

fn roots(path: &Path, pem: &[u8]) -> Result<rustls::RootCertStore, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path, pem)? {
        roots.add(c)?;
    }
    Ok(roots)
}

fn verifier(roots: rustls::RootCertStore) -> Result<Arc<dyn ClientCertVerifier>, Error> {
    Ok(WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build()?)
}

fn build(files: &TlsFiles, pems: &[Vec<u8>], client_auth: bool) -> Result<Built, Error> {
    let main = roots(&files.ca, &pems[0])?;
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let mut main_only = None;
    let builder = if client_auth {
        let mut all = main.clone();
        if let (Some(path), Some(pem)) = (&files.node_ca, pems.get(3)) {
            for c in certs(path, pem)? {
                all.add(c)?;
            }
            main_only = Some(verifier(main)?);
        }
        builder.with_client_cert_verifier(verifier(all)?)
    } else {
        builder.with_no_client_auth()
    };
    let mut cfg =
        builder.with_single_cert(certs(&files.cert, &pems[1])?, key(&files.key, &pems[2])?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Built {
        config: Arc::new(cfg),
        main_only,
    })
}

/// The current server TLS config, rebuilt when its files change.
pub struct Reloading {
    files: TlsFiles,
    client_auth: bool,
    current: RwLock<Arc<Built>>,
    loaded: Mutex<Vec<Vec<u8>>>,
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
        let pems = Self::read_all(&files)?;
        let built = build(&files, &pems, client_auth)?;
        Ok(Arc::new(Self {
            files,
            client_auth,
            current: RwLock::new(Arc::new(built)),
            loaded: Mutex::new(pems),
        }))
    }

    fn read_all(files: &TlsFiles) -> Result<Vec<Vec<u8>>, Error> {
        files.paths().into_iter().map(read).collect()
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls lock").config.clone()
    }

    /// Which CA a client chain (end entity first, as the handshake verified it) ends at.
    /// Without a node CA every verified chain is the main CA's. A chain the main CA alone
    /// does not verify (now) counts as the node CA's: the narrower right, never the wider.
    pub fn anchor(&self, chain: &[CertificateDer<'static>]) -> Anchor {
        let built = self.current.read().expect("tls lock").clone();
        let Some(main_only) = &built.main_only else {
            return Anchor::Main;
        };
        let Some((end, intermediates)) = chain.split_first() else {
            return Anchor::NodeCa;
        };
        match main_only.verify_client_cert(end, intermediates, UnixTime::now()) {
            Ok(_) => Anchor::Main,
            Err(_) => Anchor::NodeCa,
        }
    }

    /// Rebuilds the config if any file changed. A broken new set of files is reported and
    /// the old config stays in use.
    pub fn reload_if_changed(&self) -> Result<bool, Error> {
        let pems = Self::read_all(&self.files)?;
        if *self.loaded.lock().expect("tls lock") == pems {
            return Ok(false);
        }
        let built = build(&self.files, &pems, self.client_auth)?;
        *self.current.write().expect("tls lock") = Arc::new(built);
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
