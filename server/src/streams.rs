//! Which stream speaks for a node, and which certificate key may.
//!
//! - One live stream per node: a new stream takes the node's slot once its Hello is valid,
//!   and the one holding it is told to end, so one certificate can never hold more than one
//!   stream (and a stream that does not even speak the protocol never displaces one).
//! - Bootstrap records the newest certificate it issued per node (its key, issue and expiry
//!   time). A stream on that key lives until that expiry (renewals re-certify the same key,
//!   so the stream holding it survives them); a stream on a key that an *older* certificate
//!   carries is superseded: refused when it opens, ended when the newer certificate is
//!   issued. A stolen certificate of an earlier key therefore dies at the latest at its own
//!   expiry, and never speaks for the node once the node has a newer one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};

use crate::hub::NodeKey;

/// A certificate's public key, as a hash of its SubjectPublicKeyInfo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyId([u8; 32]);

/// What a stream's certificate says about its key and age.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertKey {
    pub key: KeyId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertKey {
    /// From a DER certificate; `None` if it does not parse.
    pub fn of_der(der: &[u8]) -> Option<CertKey> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let at = |t: x509_parser::time::ASN1Time| {
            Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).ok()?))
        };
        Some(CertKey {
            key: KeyId(*blake3::hash(cert.public_key().raw).as_bytes()),
            not_before: at(cert.validity().not_before)?,
            not_after: at(cert.validity().not_after)?,
        })
    }

    /// From a PEM certificate (the first one in it).
    pub fn of_pem(pem: &str) -> Option<CertKey> {
        let der = rustls_pemfile::certs(&mut pem.as_bytes()).next()?.ok()?;
        CertKey::of_der(&der)
    }

    /// Whether `newer`, issued to the same node, supersedes a stream on this certificate.
    pub fn superseded_by(&self, newer: &CertKey) -> bool {
        newer.key != self.key && newer.not_before > self.not_before
    }
}

/// Why a stream may not open.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a newer certificate with another key was issued to this node")]
pub struct Superseded;

struct Slot {
    id: u64,
    end: oneshot::Sender<()>,
}

#[derive(Default)]
pub struct Streams {
    next: Mutex<u64>,
    live: Mutex<HashMap<NodeKey, Slot>>,
    issued: Mutex<HashMap<NodeKey, watch::Sender<Option<CertKey>>>>,
}

/// A stream's right to its node's slot ([`Claim::take_over`]); the slot is released on drop
/// (unless a newer stream holds it by then).
pub struct Claim {
    streams: Option<(Arc<Streams>, NodeKey, u64)>,
    /// The sender half of `replaced`: moves into the slot on take-over; kept here (pending)
    /// until then, and for ever by unmanaged claims.
    end: Option<oneshot::Sender<()>>,
    took_over: bool,
    /// Fires when a newer stream of the same node takes over.
    pub replaced: oneshot::Receiver<()>,
    /// The newest certificate bootstrap issued to the node.
    pub issued: watch::Receiver<Option<CertKey>>,
}

impl Claim {
    /// A claim that nothing ever replaces (a [`crate::sync::Source`] without slots).
    pub fn unmanaged() -> Claim {
        let (tx, replaced) = oneshot::channel();
        Claim {
            streams: None,
            end: Some(tx),
            took_over: false,
            replaced,
            issued: watch::channel(None).1,
        }
    }
}

impl Claim {
    /// Makes this stream its node's one live stream; the stream holding the slot is told to
    /// end.
    pub fn take_over(&mut self) {
        let Some((s, key, id)) = &self.streams else {
            return;
        };
        let Some(end) = self.end.take() else {
            return;
        };
        self.took_over = true;
        let old = s
            .live
            .lock()
            .expect("streams lock")
            .insert(key.clone(), Slot { id: *id, end });
        if let Some(old) = old {
            let _ = old.end.send(());
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.took_over {
            return;
        }
        if let Some((s, key, id)) = self.streams.take() {
            let mut live = s.live.lock().expect("streams lock");
            if live.get(&key).is_some_and(|slot| slot.id == id) {
                live.remove(&key);
            }
        }
    }
}

impl Streams {
    fn issued_channel(&self, key: &NodeKey) -> watch::Sender<Option<CertKey>> {
        self.issued
            .lock()
            .expect("issued lock")
            .entry(key.clone())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    /// Bootstrap issued `node` this certificate.
    pub fn issued(&self, cluster: &str, node: &str, cert: CertKey) {
        let key = (Arc::from(cluster), Arc::from(node));
        self.issued_channel(&key).send_if_modified(|cur| {
            let newer =
                cur.is_none_or(|c| (cert.not_before, cert.not_after) > (c.not_before, c.not_after));
            if newer {
                *cur = Some(cert);
            }
            newer
        });
    }

    /// The right to `node`'s slot for a stream on `cert` (`None`: no certificate, plaintext
    /// mode); refused if a newer certificate for another key was issued to the node.
    pub fn claim(
        self: &Arc<Self>,
        cluster: &str,
        node: &str,
        cert: Option<&CertKey>,
    ) -> Result<Claim, Superseded> {
        let key: NodeKey = (Arc::from(cluster), Arc::from(node));
        let issued = self.issued_channel(&key).subscribe();
        if let (Some(mine), Some(newest)) = (cert, issued.borrow().as_ref())
            && mine.superseded_by(newest)
        {
            return Err(Superseded);
        }
        let id = {
            let mut n = self.next.lock().expect("streams lock");
            *n += 1;
            *n
        };
        let (end, replaced) = oneshot::channel();
        Ok(Claim {
            streams: Some((self.clone(), key, id)),
            end: Some(end),
            took_over: false,
            replaced,
            issued,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(key: u8, issued_at: u64) -> CertKey {
        CertKey {
            key: KeyId([key; 32]),
            not_before: UNIX_EPOCH + Duration::from_secs(issued_at),
            not_after: UNIX_EPOCH + Duration::from_secs(issued_at + 60),
        }
    }

    #[test]
    fn a_new_stream_replaces_the_old_one_and_only_its_own_drop_frees_the_slot() {
        let s = Arc::new(Streams::default());
        let mut a = s.claim("c", "n1", None).unwrap();
        a.take_over();
        let mut b = s.claim("c", "n1", None).unwrap();
        // Not before its Hello: a stream that never speaks displaces nothing.
        assert!(a.replaced.try_recv().is_err());
        b.take_over();
        assert!(a.replaced.try_recv().is_ok());
        assert!(b.replaced.try_recv().is_err());
        // The replaced stream ending must not free the slot its successor holds.
        drop(a);
        assert_eq!(s.live.lock().unwrap().len(), 1);
        // Another node has its own slot.
        let mut c = s.claim("c", "n2", None).unwrap();
        c.take_over();
        assert!(b.replaced.try_recv().is_err() && c.replaced.try_recv().is_err());
        drop((b, c));
        assert!(s.live.lock().unwrap().is_empty());
    }

    #[test]
    fn an_older_key_is_superseded_the_renewed_key_is_not() {
        let s = Arc::new(Streams::default());
        let old = cert(1, 100);
        let mut claim = s.claim("c", "n1", Some(&old)).unwrap();
        // A renewal of the same key: newer certificate, same key, not superseded.
        s.issued("c", "n1", cert(1, 140));
        let renewed = (*claim.issued.borrow_and_update()).unwrap();
        assert!(!old.superseded_by(&renewed));
        // A certificate for a new key: the older certificate is superseded.
        s.issued("c", "n1", cert(2, 150));
        assert!(claim.issued.has_changed().unwrap());
        assert_eq!(
            s.claim("c", "n1", Some(&old)).err(),
            Some(Superseded),
            "a stream on the older key may not open"
        );
        assert!(s.claim("c", "n1", Some(&cert(1, 140))).is_err());
        assert!(s.claim("c", "n1", Some(&cert(2, 150))).is_ok());
        // A certificate newer than the newest issued (an operator's static one) is not.
        assert!(s.claim("c", "n1", Some(&cert(3, 200))).is_ok());
        // An out-of-order older issue does not roll the newest back.
        s.issued("c", "n1", cert(1, 120));
        assert!(s.claim("c", "n1", Some(&old)).is_err());
    }
}
