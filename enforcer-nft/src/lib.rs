//! The nftables dataplane.
//!
//! ```text
//!  table inet moat
//!    chain forward (filter, hook forward, priority 0: after kube-proxy's DNAT in prerouting,
//!                   before SNAT in postrouting; a node's own traffic to its pods takes the
//!                   output hook and is never judged)
//!      ct state established,related accept        ← replies and related ICMP errors
//!      ct state invalid drop
//!      jump sender      ← by input interface: a pod's (interface, source) → its egress
//!                         ruleset, else spoofed or unknown; elsewhere a local pod's
//!                         source is spoofed; an unclassified interface drops
//!      oif vmap @out_if ← a pod's (interface, destination) → its ingress ruleset, else
//!                         unknown; elsewhere remote; an unclassified interface drops
//!    chain i_…/e_… per distinct rule list: a fixed number of set lookups (see `desired`)
//!    maps class4/class6 (CIDR ranges → class, intervals), addr4/addr6 (single addresses →
//!    class, hash: pod churn never touches an interval set), sets per ruleset, the local
//!    pod table (`local`), set record (one element: version, digest and epoch)
//! ```
//!
//! The ruleset chains, their sets and the class maps are named after the class numbering
//! (`…_<epoch>`); the base chains and the local pod table are shared by every epoch. A delta
//! is one transaction that adds and removes only the elements and chains that changed, the
//! local pod table's in the same batch as the rules naming its pods. A full snapshot builds
//! the table in one transaction when there is none; one in force is replaced beside itself
//! (`render::stage`, `switch`, `sweep`), since a packet caught in the old rules by a commit
//! that deletes their maps would be dropped. The table records the version and digest it
//! holds, so a restarted enforcer trusts what the kernel says.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

/// The dataplane plan both backends share (classes, rulesets, endpoint maps).
pub use moat_dataplane::plan as desired;
pub use moat_dataplane::plan::incremental;

mod backend;
pub mod local;
pub mod netlink;
pub mod nft;
pub mod render;

pub use backend::NftBackend;

/// `--nft-max-elements` by default: a version whose table would hold more is applied with
/// the rule lists that don't fit denied (see `moat_dataplane::plan::budget`).
pub const DEFAULT_MAX_ELEMENTS: usize = 2_000_000;

/// Which way a delta reached the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Netlink,
    Nft,
}

/// Commits a delta batch (from [`render::delta`]) as one transaction: element-only batches
/// (pod churn) straight over netlink, everything else through `nft`. Same commands, same
/// all-or-nothing guarantee either way.
pub fn commit_delta(
    lock: &nft::TxLock,
    conn: &mut Option<netlink::Conn>,
    commands: Vec<serde_json::Value>,
) -> Result<Via, nft::Error> {
    if conn.is_none() {
        // Without a netlink socket every batch goes through nft.
        *conn = netlink::Conn::open().ok();
    }
    let Some(c) = conn else {
        return nft::apply(lock, commands).map(|()| Via::Nft);
    };
    // Encodes once: `Ok(false)` (nothing sent) when the batch needs nft.
    match c.apply(&commands) {
        Ok(true) => Ok(Via::Netlink),
        Ok(false) => nft::apply(lock, commands).map(|()| Via::Nft),
        Err(e) => {
            // A fresh socket next time: this one may hold answers we never read.
            *conn = None;
            Err(nft::Error::Refused(e.to_string()))
        }
    }
}

/// How many elements the kernel table of `d` holds (what `--nft-max-elements` limits).
/// The plan counts an entry per isolated endpoint address and direction and one per local
/// pod address; the table holds the local pod table (`local`) instead, which names the
/// rulesets itself.
pub fn table_elements(d: &desired::Desired) -> usize {
    let plan_only = d.ing4.len() + d.ing6.len() + d.eg4.len() + d.eg6.len() + d.local.addrs.len();
    d.elements() - plan_only + local::elements(&d.local)
}
