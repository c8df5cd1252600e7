//! Running `nft`: one JSON batch per change, which `nft -j -f -` (through the `nftables`
//! crate's runner) applies as one kernel transaction. The batch is passed as raw JSON: the
//! crate's schema (0.6) has no `verdict` map type, which the endpoint maps need; the unit
//! tests check every other command against the crate's schema.

use nftables::helper;
use nftables::schema::{NfListObject, NfObject};
use serde_json::Value;

use crate::render::{TABLE, parse_info};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("internal: cannot encode the batch: {0}")]
    Schema(serde_json::Error),
    #[error("nft: {0}")]
    Nft(#[from] helper::NftablesError),
}

/// Applies `commands` as one transaction.
pub fn apply(commands: Vec<Value>) -> Result<(), Error> {
    if commands.is_empty() {
        return Ok(());
    }
    let batch = serde_json::to_string(&serde_json::json!({ "nftables": commands })).map_err(Error::Schema)?;
    helper::apply_ruleset_raw(&batch, helper::DEFAULT_NFT, helper::DEFAULT_ARGS)?;
    Ok(())
}

/// The version and digest recorded in the Moat table, if the table exists.
pub fn recorded() -> Result<Option<(u64, String)>, Error> {
    let list = match helper::get_current_ruleset_with_args(helper::DEFAULT_NFT, ["list", "table", "inet", TABLE]) {
        Ok(l) => l,
        // No table: nothing recorded.
        Err(helper::NftablesError::NftFailed { stderr, .. }) if stderr.contains("No such file") => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut found = None;
    for o in list.objects.iter() {
        if let NfObject::ListObject(NfListObject::Chain(c)) = o
            && let Some(info) = parse_info(&c.name)
        {
            found = Some(info);
        }
    }
    // A table without a record is Moat's but unfinished: treat as holding unknown rules.
    Ok(Some(found.unwrap_or((0, String::new()))))
}

/// Packets dropped by Moat's rules so far.
pub fn denied() -> Option<u64> {
    let raw = helper::get_current_ruleset_raw(helper::DEFAULT_NFT, ["list", "counter", "inet", TABLE, "denied"]).ok()?;
    let v: Value = serde_json::from_str(&raw).ok()?;
    v["nftables"]
        .as_array()?
        .iter()
        .find_map(|o| o["counter"]["packets"].as_u64())
}

/// Deletes the Moat table (uninstall).
pub fn delete_table() -> Result<(), Error> {
    apply(vec![
        serde_json::json!({"add": {"table": {"family": "inet", "name": TABLE}}}),
        serde_json::json!({"delete": {"table": {"family": "inet", "name": TABLE}}}),
    ])
}
