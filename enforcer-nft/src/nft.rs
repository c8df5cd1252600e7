//! Running `nft`: one JSON batch per change, which `nft -j -f -` applies as one kernel
//! transaction. The batch is raw JSON: the `nftables` crate's schema (0.6) has no `verdict`
//! map type, which the endpoint maps need; the unit tests check every other command against
//! the crate's schema, and reads go through the crate.
//!
//! Writers are serialised by [`TxLock`], an flock whose file each `nft` child holds as its
//! stdout: if the enforcer is killed mid-transaction, the orphaned `nft` keeps the lock until
//! it has committed or failed, and the next enforcer waits for it before reading the table.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nftables::helper;
use serde_json::Value;

use crate::render::{RECORD, TABLE, parse_info};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("internal: cannot encode the batch: {0}")]
    Schema(serde_json::Error),
    #[error("nft: {0}")]
    Nft(#[from] helper::NftablesError),
    #[error("running nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the batch: {0}")]
    Refused(String),
    #[error("{path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is held by another moat-enforcer or its unfinished nft transaction")]
    Busy(PathBuf),
}

/// How long a starting enforcer waits for a predecessor's unfinished `nft` transaction.
pub const LOCK_WAIT_DEFAULT: Duration = Duration::from_secs(10);

/// The right to change the Moat table (see the module docs).
pub struct TxLock {
    file: File,
}

impl TxLock {
    /// Takes the lock at `path`, waiting up to `wait` for a previous holder to finish.
    pub fn acquire(path: &Path, wait: Duration) -> Result<TxLock, Error> {
        let err = |source| Error::Lock {
            path: path.to_path_buf(),
            source,
        };
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(err)?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(TxLock { file }),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::Busy(path.to_path_buf()));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
            }
        }
    }
}

/// Applies `commands` as one transaction.
pub fn apply(lock: &TxLock, commands: Vec<Value>) -> Result<(), Error> {
    if commands.is_empty() {
        return Ok(());
    }
    let batch =
        serde_json::to_vec(&serde_json::json!({ "nftables": commands })).map_err(Error::Schema)?;
    let holder = lock.file.try_clone().map_err(Error::Spawn)?;
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::from(holder))
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::Spawn)?;
    // A write error (nft exited early) shows up as nft's own error below.
    let _ = child.stdin.take().expect("piped").write_all(&batch);
    let out = child.wait_with_output().map_err(Error::Spawn)?;
    if !out.status.success() {
        return Err(Error::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Is there a Moat table in this namespace?
pub fn table_exists() -> Result<bool, Error> {
    let raw = helper::get_current_ruleset_raw(helper::DEFAULT_NFT, ["list", "tables", "inet"])?;
    let v: Value = serde_json::from_str(&raw).map_err(Error::Schema)?;
    Ok(v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["table"]["name"] == TABLE))
}

/// A table's chains and sets (maps included), without their elements.
#[derive(Debug, Default)]
pub struct Objects {
    pub chains: Vec<String>,
    /// As `nft -j` lists them (name, type, and a map's data type), for `render::sweep`.
    pub sets: Vec<Value>,
}

/// What the Moat table holds, `None` if there is no table. Terse listings: reading a big
/// table's elements would cost more than the change being made.
pub fn objects() -> Result<Option<Objects>, Error> {
    if !table_exists()? {
        return Ok(None);
    }
    let list = |what: &str, kind: &str| -> Result<Vec<Value>, Error> {
        let raw =
            helper::get_current_ruleset_raw(helper::DEFAULT_NFT, ["-t", "list", what, "inet"])?;
        let v: Value = serde_json::from_str(&raw).map_err(Error::Schema)?;
        Ok(v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|o| o[kind]["table"] == TABLE)
            .map(|o| o[kind].clone())
            .collect())
    };
    let mut sets = list("sets", "set")?;
    sets.extend(list("maps", "map")?);
    let chains = list("chains", "chain")?
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect();
    Ok(Some(Objects { chains, sets }))
}

/// The version and digest recorded in the Moat table, if the table exists. Read as raw JSON:
/// the crate's schema cannot parse the table's verdict maps.
pub fn recorded() -> Result<Option<(u64, String)>, Error> {
    let raw = helper::get_current_ruleset_raw(helper::DEFAULT_NFT, ["list", "tables", "inet"])?;
    let v: Value = serde_json::from_str(&raw).map_err(Error::Schema)?;
    let table = v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["table"]["name"] == TABLE);
    if !table {
        return Ok(None);
    }
    // A table without a record is Moat's but unfinished: treat as holding unknown rules.
    let found = helper::get_current_ruleset_raw(
        helper::DEFAULT_NFT,
        ["list", "set", "inet", TABLE, RECORD],
    )
    .ok()
    .and_then(|raw| serde_json::from_str::<Value>(&raw).ok())
    .and_then(|v| {
        v["nftables"].as_array()?.iter().find_map(|o| {
            o["set"]["elem"]
                .as_array()?
                .iter()
                .find_map(|e| e["elem"]["comment"].as_str().and_then(parse_info))
        })
    });
    Ok(Some(found.unwrap_or((0, String::new()))))
}

/// Every named counter of the Moat table: name → packets (empty without the table).
pub fn counters() -> BTreeMap<String, u64> {
    let Ok(raw) = helper::get_current_ruleset_raw(
        helper::DEFAULT_NFT,
        ["list", "counters", "table", "inet", TABLE],
    ) else {
        return BTreeMap::new();
    };
    let Ok(v) = serde_json::from_str::<Value>(&raw) else {
        return BTreeMap::new();
    };
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| {
            let c = &o["counter"];
            Some((c["name"].as_str()?.to_string(), c["packets"].as_u64()?))
        })
        .collect()
}

/// Deletes the Moat table (uninstall, or a node another dataplane now enforces).
///
/// First, in a transaction of its own, an `accept` goes in front of the forward hook's
/// rules: deleting a table with sets, verdict maps and chains in one transaction was seen
/// to drop an allowed SYN in flight (the switching test, about 1 switch in 20: the packet died in
/// `nft_do_chain` while the table went). Whoever removes the table has decided that nothing
/// of it is to be enforced any more, so accepting first opens nothing the deletion would
/// not; it only keeps a packet judged mid-deletion from being dropped. A table without the
/// forward chain (never expected) is deleted directly.
pub fn delete_table(lock: &TxLock) -> Result<(), Error> {
    let accept_first = serde_json::json!({"insert": {"rule": {
        "family": "inet", "table": TABLE, "chain": "forward", "expr": [{"accept": null}]
    }}});
    if let Err(e) = apply(lock, vec![accept_first]) {
        tracing::debug!(error = %e, "no forward chain to open first; deleting the table directly");
    }
    apply(
        lock,
        vec![
            serde_json::json!({"add": {"table": {"family": "inet", "name": TABLE}}}),
            serde_json::json!({"delete": {"table": {"family": "inet", "name": TABLE}}}),
        ],
    )
}

/// Returns once every packet that was inside the table's rules when it was called has left
/// them. The kernel keeps replaced rules alive for such a packet but not the objects it will
/// still look up: it looks them up in the generation in force *now*, where a deleted map
/// holds nothing. The forward hook runs a packet's whole traversal in one RCU read-side
/// section, and `MEMBARRIER_CMD_GLOBAL` is `synchronize_rcu()`: after it, no packet that
/// could reach an object of an earlier generation's rules is still on its way.
///
/// Where the kernel refuses the command (`nohz_full` CPUs, no `membarrier`), waits
/// [`GRACE_FALLBACK`] instead: longer than any packet's traversal short of a stalled CPU,
/// and what that costs is an allowed packet dropped, never a denied one passed.
pub fn grace_period() {
    use rustix::thread::{MembarrierCommand, membarrier};
    if let Err(e) = membarrier(MembarrierCommand::Global) {
        tracing::debug!(error = %e, "membarrier(GLOBAL) refused; waiting instead");
        std::thread::sleep(GRACE_FALLBACK);
    }
}

/// See [`grace_period`].
pub const GRACE_FALLBACK: Duration = Duration::from_millis(100);
