//! Node identity bootstrap, enforcer side: trade the projected ServiceAccount token for a
//! short-lived node certificate, and renew it before it expires.
//!
//! The key never leaves the node (only a CSR travels). One key serves a whole run: renewals
//! re-certify it, and the server extends the live stream on exactly that key, so renewing
//! never drops the stream; a restart generates a new key, and the server then refuses and
//! ends streams on certificates of the old one. Files are written key first, then
//! certificate, each atomically, so the agent (which reads them on every connection) never
//! pairs a new certificate with an old key.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use moat_proto::v1;
use rand::Rng;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("refused: {}: {}", .0.code(), .0.message())]
    Refused(#[from] tonic::Status),
}

#[derive(Clone, Debug)]
pub struct Bootstrap {
    /// `https://host:port` of the server's bootstrap listener.
    pub server: String,
    pub ca: PathBuf,
    pub server_name: Option<String>,
    pub token_file: PathBuf,
    pub cluster: String,
    pub node: String,
    /// Where the certificate and key go (the agent's `--tls-cert` / `--tls-key`).
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Bootstrap {
    /// Gets a certificate for `key` now; returns its lifetime (issued, expires).
    pub async fn issue(&self, key: &rcgen::KeyPair) -> Result<(SystemTime, SystemTime), Error> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| Error::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        // kubelet rotates the projected token: read it fresh every time.
        let token = String::from_utf8_lossy(&read(&self.token_file)?)
            .trim()
            .to_string();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(key)?
            .pem()?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&self.ca)?));
        if let Some(n) = &self.server_name {
            tls = tls.domain_name(n.clone());
        }
        let channel = Endpoint::from_shared(self.server.clone())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .tls_config(tls)?
            .connect()
            .await?;
        let issued = SystemTime::now();
        let r = v1::bootstrap_client::BootstrapClient::new(channel)
            .issue(v1::IssueRequest {
                cluster: self.cluster.clone(),
                node: self.node.clone(),
                token,
                csr_pem: csr,
            })
            .await?
            .into_inner();
        write(&self.key, key.serialize_pem().as_bytes(), true)?;
        write(&self.cert, r.cert_pem.as_bytes(), false)?;
        let expires = moat_proto::from_unix_micros(r.not_after_unix_micros);
        info!(node = %self.node, expires_in = ?expires.duration_since(SystemTime::now()).unwrap_or_default(), "node certificate issued");
        Ok((issued, expires))
    }

    /// Gets the first certificate, then renews at two thirds of each one's life, for ever.
    /// The rules in force stay in force meanwhile; the agent picks up each new certificate on
    /// its next connection, and the server extends the current stream.
    pub async fn run(self) {
        let key = match rcgen::KeyPair::generate() {
            Ok(k) => k,
            Err(e) => {
                warn!(error = %e, "cannot generate a key; no certificate will be requested");
                return;
            }
        };
        loop {
            let life = self.issue_with_retry(&key).await;
            let span = life.1.duration_since(life.0).unwrap_or_default();
            let at = life.0 + span * 2 / 3;
            tokio::time::sleep(at.duration_since(SystemTime::now()).unwrap_or_default()).await;
        }
    }

    /// Retries with exponential backoff and full jitter, so a fleet restarting together does
    /// not come back in lockstep.
    async fn issue_with_retry(&self, key: &rcgen::KeyPair) -> (SystemTime, SystemTime) {
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.issue(key).await {
                Ok(life) => return life,
                Err(e) => {
                    warn!(error = %e, "getting a node certificate failed; retrying");
                    let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64);
                    tokio::time::sleep(
                        Duration::from_millis(jitter).max(Duration::from_millis(200)),
                    )
                    .await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

fn write(path: &Path, pem: &[u8], secret: bool) -> Result<(), Error> {
    moat_proto::pki::write_pem(path, pem, secret).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })
}
