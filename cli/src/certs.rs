//! `moatctl certs`: a CA and the certificates Moat's mutual TLS needs, for the quick start
//! and for clusters without a PKI of their own.
//!
//! Identities live in URI SANs (see `moat_proto::identity`); the server certificate carries
//! DNS and IP SANs for the addresses enforcers dial.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use moat_proto::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Create a CA and the server certificate.
    Init {
        #[arg(long, default_value = ".moat/certs")]
        dir: PathBuf,
        /// DNS names enforcers use to reach the server.
        #[arg(long = "server-name", default_values = ["moat-server", "localhost"])]
        server_names: Vec<String>,
        /// IP addresses enforcers use to reach the server.
        #[arg(long = "server-ip", default_values = ["127.0.0.1", "::1"])]
        server_ips: Vec<IpAddr>,
        /// Replace an existing CA (every certificate it signed stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Create the node CA (`node-ca.pem`, `node-ca-key.pem`): the separate CA bootstrap
    /// signs node certificates with (`moat-server --tls-node-ca … --bootstrap-ca-key …`).
    /// The server accepts its certificates for node identities on the sync API only, so its
    /// key — which the server must hold — cannot mint admin certificates.
    InitNodeCa {
        #[arg(long, default_value = ".moat/certs")]
        dir: PathBuf,
        /// Replace an existing node CA (every node certificate it signed stops being
        /// trusted once the server reloads).
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate for one node's enforcer.
    IssueNode {
        #[arg(long, default_value = ".moat/certs")]
        dir: PathBuf,
        #[arg(long)]
        node: String,
        #[arg(long, default_value = "default")]
        cluster: String,
        /// Validity, e.g. `90d`, `12h`, `30s`.
        #[arg(long, default_value = "90d")]
        valid_for: String,
    },
    /// Issue a certificate for an operator (the admin API: status, explain).
    IssueAdmin {
        #[arg(long, default_value = ".moat/certs")]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "30d")]
        valid_for: String,
    },
    /// Re-issue the server certificate (e.g. to rotate it; the server reloads it live).
    IssueServer {
        #[arg(long, default_value = ".moat/certs")]
        dir: PathBuf,
        #[arg(long = "server-name", default_values = ["moat-server", "localhost"])]
        server_names: Vec<String>,
        #[arg(long = "server-ip", default_values = ["127.0.0.1", "::1"])]
        server_ips: Vec<IpAddr>,
        #[arg(long, default_value = "365d")]
        valid_for: String,
    },
}

pub fn run(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Init {
            dir,
            server_names,
            server_ips,
            force,
        } => {
            if dir.join("ca.pem").exists() && !force {
                bail!(
                    "{} already holds a CA; use --force to replace it",
                    dir.display()
                );
            }
            self_signed_ca(&dir, "ca", "Moat CA")?;
            server(&dir, &server_names, &server_ips, parse_duration("365d")?)?;
            println!(
                "wrote {}/{{ca,ca-key,server,server-key}}.pem",
                dir.display()
            );
        }
        Command::InitNodeCa { dir, force } => {
            if dir.join("node-ca.pem").exists() && !force {
                bail!(
                    "{} already holds a node CA; use --force to replace it",
                    dir.display()
                );
            }
            self_signed_ca(&dir, "node-ca", "Moat node CA")?;
            println!(
                "wrote {}/{{node-ca,node-ca-key}}.pem: give the server --tls-node-ca node-ca.pem --bootstrap-ca-key node-ca-key.pem (and never ca-key.pem)",
                dir.display()
            );
        }
        Command::IssueServer {
            dir,
            server_names,
            server_ips,
            valid_for,
        } => {
            server(
                &dir,
                &server_names,
                &server_ips,
                parse_duration(&valid_for)?,
            )?;
            println!("wrote {}/{{server,server-key}}.pem", dir.display());
        }
        Command::IssueNode {
            dir,
            node,
            cluster,
            valid_for,
        } => {
            let id = Identity::node(&cluster, &node);
            identity(&dir, &format!("node-{node}"), &id, &valid_for)?;
        }
        Command::IssueAdmin {
            dir,
            name,
            valid_for,
        } => {
            let id = Identity::Admin { name: name.clone() };
            identity(&dir, &format!("admin-{name}"), &id, &valid_for)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A self-signed CA, ten years, as `<dir>/<base>.pem` and `<base>-key.pem`.
fn self_signed_ca(dir: &Path, base: &str, cn: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = name(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, parse_duration("3650d")?)?;
    let cert = p.self_signed(&key)?;
    write_pair(dir, base, &key, &cert)
}

/// Issues a client certificate for a node or admin identity into `<dir>/<base>{,-key}.pem`.
fn identity(dir: &Path, base: &str, id: &Identity, valid_for: &str) -> Result<()> {
    let names: Vec<(&str, &str)> = match id {
        Identity::Node { cluster, node } => vec![("--cluster", cluster), ("--node", node)],
        Identity::Admin { name } => vec![("--name", name)],
    };
    for (flag, n) in names {
        if !moat_proto::identity::valid_name(n) {
            bail!("{}", moat_proto::identity::name_error(flag, n));
        }
    }
    leaf(
        dir,
        base,
        id,
        ExtendedKeyUsagePurpose::ClientAuth,
        parse_duration(valid_for)?,
    )?;
    println!(
        "wrote {}/{base}.pem and {base}-key.pem for {}",
        dir.display(),
        id.uri()
    );
    Ok(())
}

fn name(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "Moat");
    d.push(DnType::CommonName, cn);
    d
}

/// Valid from a minute ago (tolerates small clock skew) for `d`; a lifetime past what a
/// certificate can state is an error, never an overflow.
fn validity(p: &mut CertificateParams, d: Duration) -> Result<()> {
    let now = std::time::SystemTime::now();
    let end = moat_proto::pki::expiry(now, d)?;
    p.not_before = OffsetDateTime::from(now) - time::Duration::minutes(1);
    p.not_after = OffsetDateTime::from(end);
    Ok(())
}

fn ca(dir: &Path) -> Result<(String, KeyPair)> {
    let cert = std::fs::read_to_string(dir.join("ca.pem")).with_context(|| {
        format!(
            "reading {}/ca.pem (run `moatctl certs init` first)",
            dir.display()
        )
    })?;
    let key = std::fs::read_to_string(dir.join("ca-key.pem"))
        .with_context(|| format!("reading {}/ca-key.pem", dir.display()))?;
    Ok((cert, KeyPair::from_pem(&key)?))
}

fn server(dir: &Path, names: &[String], ips: &[IpAddr], d: Duration) -> Result<()> {
    let (ca_pem, ca_key) = ca(dir)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(names.to_vec())?;
    p.subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    p.distinguished_name = name("moat-server");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut p, d)?;
    let cert = p.signed_by(&key, &issuer)?;
    // Key first, then certificate: a reloading server never pairs a new cert with an old key
    // for longer than one reload interval, and both are written atomically.
    write(&dir.join("server-key.pem"), &key.serialize_pem(), true)?;
    write(&dir.join("server.pem"), &cert.pem(), false)?;
    Ok(())
}

fn leaf(
    dir: &Path,
    base: &str,
    id: &Identity,
    usage: ExtendedKeyUsagePurpose,
    d: Duration,
) -> Result<()> {
    let (ca_pem, ca_key) = ca(dir)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.uri().try_into()?)];
    p.distinguished_name = name(&id.to_string());
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut p, d)?;
    let cert = p.signed_by(&key, &issuer)?;
    write_pair(dir, base, &key, &cert)
}

fn write(path: &Path, text: &str, secret: bool) -> Result<()> {
    moat_proto::pki::write_pem(path, text.as_bytes(), secret)
        .with_context(|| format!("writing {}", path.display()))
}

/// `90d`, `12h`, `30m`, `45s`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    Ok(moat_proto::pki::parse_lifetime(s)?)
}

/// Writes `base-key.pem`, then `base.pem`: key first, so a certificate on disk always has
/// its key.
fn write_pair(dir: &Path, base: &str, key: &KeyPair, cert: &rcgen::Certificate) -> Result<()> {
    write(
        &dir.join(format!("{base}-key.pem")),
        &key.serialize_pem(),
        true,
    )?;
    write(&dir.join(format!("{base}.pem")), &cert.pem(), false)
}
