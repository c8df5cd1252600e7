//! Fleet-unique version ranges: every replica start takes an epoch from one ConfigMap with
//! optimistic concurrency, and hands out versions only inside `[epoch << 40, (epoch+1) << 40)`.
//!
//! Two replicas never hold one epoch: both read `next = n`, both write `n + 1` naming the
//! `resourceVersion` they read, and the API server lets exactly one write through (the other
//! gets `409 Conflict`, reads again and takes `n + 1`). The epoch never goes back either:
//! it is above the replica's own last epoch (kept in its sled), above every epoch a
//! replica's heartbeat object names (they stay after a replica is gone), and at least the
//! hours since 2026-01-01, so a deleted or restored counter starts again above what was
//! handed out.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ListParams, PostParams};
use tracing::{debug, info};

use super::Error;

/// The ConfigMap holding the next free epoch.
pub const EPOCHS: &str = "moat-server-epochs";
/// Versions of one epoch: the low 40 bits count the replica's generations.
pub const EPOCH_SHIFT: u32 = 40;
/// Epochs stay below 2^22, so versions stay below 2^62 (an i64 in metrics, JSON-safe as an
/// integer in every tool that keeps 64-bit integers).
pub const MAX_EPOCH: u64 = (1 << 22) - 1;

/// The first version of `epoch`.
pub fn first_version(epoch: u64) -> u64 {
    epoch << EPOCH_SHIFT
}

/// Versions of `epoch` stay below this.
pub fn ceiling(epoch: u64) -> u64 {
    (epoch + 1) << EPOCH_SHIFT
}

/// The epoch a version was handed out in (0: a single server's own numbering).
pub fn epoch_of(version: u64) -> u64 {
    version >> EPOCH_SHIFT
}

/// Hours since 2026-01-01T00:00:00Z: a floor that only moves forward.
fn clock_floor(now: SystemTime) -> u64 {
    const START: u64 = 1_767_225_600;
    now.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().saturating_sub(START) / 3600)
}

/// What to store as `next` after taking an epoch from `stored` (absent: a new ConfigMap).
pub fn take(stored: Option<u64>, own_last: u64, now: SystemTime) -> u64 {
    stored
        .unwrap_or(0)
        .max(own_last + 1)
        .max(clock_floor(now))
        .max(1)
}

/// Takes this replica's epoch (see the module text). `own_last`: the store's last epoch.
pub async fn acquire(api: &Api<ConfigMap>, replica: &str, own_last: u64) -> Result<u64, Error> {
    for attempt in 0..100u32 {
        if attempt > 0 {
            // Many replicas starting at once: spread the retries.
            let ms = rand::random_range(5..50u64) * u64::from(attempt.min(10));
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let found = api.get_opt(EPOCHS).await.map_err(Error::Api)?;
        let stored = match &found {
            None => None,
            Some(cm) => Some(
                cm.data
                    .as_ref()
                    .and_then(|d| d.get("next"))
                    .and_then(|n| n.parse::<u64>().ok())
                    .ok_or_else(|| Error::Damaged {
                        what: EPOCHS.into(),
                        why: "data.next is missing or not a number".into(),
                    })?,
            ),
        };
        // Every replica's heartbeat names its epoch: a reset or restored counter still
        // starts above every replica that ever beat.
        let beats = api
            .list(&ListParams::default().labels("moat.io/role=replica"))
            .await
            .map_err(Error::Api)?;
        let highest_beat = beats
            .items
            .iter()
            .filter_map(|cm| cm.data.as_ref()?.get("epoch")?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        let epoch = take(stored, own_last.max(highest_beat), SystemTime::now());
        if epoch > MAX_EPOCH {
            return Err(Error::Damaged {
                what: EPOCHS.into(),
                why: format!("epoch {epoch} is beyond the last one ({MAX_EPOCH})"),
            });
        }
        let mut cm = found.unwrap_or_else(|| ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(EPOCHS.into()),
                labels: Some(super::labels("epochs")),
                ..Default::default()
            },
            ..Default::default()
        });
        let data = cm.data.get_or_insert_with(Default::default);
        data.insert("next".into(), (epoch + 1).to_string());
        data.insert("last".into(), format!("{epoch} {replica}"));
        let written = if cm.metadata.resource_version.is_some() {
            // Carries the resourceVersion read: a concurrent taker makes this a conflict.
            api.replace(EPOCHS, &PostParams::default(), &cm).await
        } else {
            api.create(&PostParams::default(), &cm).await
        };
        match written {
            Ok(_) => {
                info!(epoch, attempt, "version epoch taken");
                return Ok(epoch);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                debug!(epoch, reason = %s.reason, "another replica took this epoch first; again");
            }
            Err(e) => return Err(Error::Api(e)),
        }
    }
    Err(Error::Contended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_is_above_everything_that_was_handed_out() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600 + 10 * 3600);
        assert_eq!(take(None, 0, t), 10, "a new ConfigMap starts at the clock");
        assert_eq!(take(Some(50), 0, t), 50);
        assert_eq!(
            take(Some(3), 70, t),
            71,
            "a recreated ConfigMap, a replica that knew 70"
        );
        assert_eq!(take(None, 0, SystemTime::UNIX_EPOCH), 1, "never epoch 0");
    }

    #[test]
    fn epochs_split_the_version_space() {
        assert_eq!(epoch_of(first_version(7)), 7);
        assert_eq!(epoch_of(ceiling(7) - 1), 7);
        assert!(ceiling(MAX_EPOCH) <= 1 << 62);
        assert!(
            first_version(1) > u64::from(u32::MAX),
            "above any single-server numbering"
        );
    }
}
