//! Writing each ClusterNetworkPolicy's acceptance to its `status.conditions` (opt-in:
//! `--write-cnp-status`; the only write Moat makes to a policy object).
//!
//! - One condition, [`CONDITION_TYPE`], written with a server-side apply patch of the
//!   status subresource: `conditions` is a map keyed by type, so the apply touches Moat's
//!   entry only and leaves other implementations' conditions alone (a merge patch would
//!   replace the whole list).
//! - Written only when what the object carries differs from what this replica means
//!   (status, reason, message, observed generation; `lastTransitionTime` moves only when the
//!   status does), so an unchanged policy costs no write, at start or on any relist.
//! - Several replicas need no leader: they compute the same condition from the same object,
//!   so their writes are idempotent and the object's next event stops the others. A replica
//!   writes one condition at most once per generation, so replicas that disagree (a rolling
//!   upgrade changing a message) never write back and forth.
//! - Writes never hold up the source: they queue here, newest per object, one at a time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use moat_policy::model::cnp_api as api;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span, warn};

use super::acceptance::Verdict;
use super::cnp::{CONDITION_TYPE, Cnp};

/// The field manager of Moat's writes (one for every replica: the entry is Moat's, not a
/// replica's).
pub const FIELD_MANAGER: &str = "moat-server";
/// The API's limit on a condition's message.
const MAX_MESSAGE: usize = 32 * 1024;
const RETRY: Duration = Duration::from_secs(10);

/// An object as last seen by the source: who it is and what its status says.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub name: String,
    pub uid: Option<String>,
    pub generation: Option<i64>,
    pub condition: Option<Condition>,
}

impl Observed {
    pub fn of(o: &Cnp) -> Observed {
        Observed {
            name: o.metadata.name.clone().unwrap_or_default(),
            uid: o.metadata.uid.clone(),
            generation: o.metadata.generation,
            condition: o.our_condition(),
        }
    }
}

#[derive(Debug)]
pub enum Work {
    Judge {
        observed: Observed,
        verdict: Verdict,
    },
    /// The object is gone.
    Forget(String),
}

/// The condition Moat means for `verdict` on `o`.
pub fn desired(verdict: &Verdict, o: &Observed, now: Time) -> Condition {
    let (status, reason) = match verdict {
        Verdict::Accepted { .. } => ("True", "Accepted"),
        Verdict::Refused { why, .. } => ("False", why.reason()),
    };
    let mut message = verdict.describe();
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    let since = o
        .condition
        .as_ref()
        .filter(|c| c.status == status)
        .map_or(now, |c| c.last_transition_time.clone());
    Condition {
        type_: CONDITION_TYPE.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: o.generation,
        last_transition_time: since,
    }
}

/// Equal in everything a reader acts on (not the transition time).
pub fn same(a: &Condition, b: &Condition) -> bool {
    (
        &a.type_,
        &a.status,
        &a.reason,
        &a.message,
        a.observed_generation,
    ) == (
        &b.type_,
        &b.status,
        &b.reason,
        &b.message,
        b.observed_generation,
    )
}

/// What this replica wrote last per object: (generation, condition).
type Written = HashMap<String, (Option<i64>, Condition)>;

/// The write `o` needs, if any.
fn needed(verdict: &Verdict, o: &Observed, written: &Written, now: Time) -> Option<Condition> {
    let want = desired(verdict, o, now);
    if o.condition.as_ref().is_some_and(|c| same(c, &want)) {
        return None;
    }
    if written
        .get(&o.name)
        .is_some_and(|(g, c)| *g == o.generation && same(c, &want))
    {
        // Written already and changed since by someone else: not fought over.
        return None;
    }
    Some(want)
}

/// Starts the writer for one cluster; it ends when the returned sender is dropped.
pub fn spawn(cluster: &str, client: Client) -> mpsc::UnboundedSender<Work> {
    let (tx, rx) = mpsc::unbounded_channel();
    let api: Api<Cnp> = Api::all(client);
    tokio::spawn(run(api, rx).instrument(info_span!("cnp-status", %cluster)));
    tx
}

async fn run(api: Api<Cnp>, mut rx: mpsc::UnboundedReceiver<Work>) {
    let mut pending: BTreeMap<String, (Observed, Verdict)> = BTreeMap::new();
    let mut failed: BTreeMap<String, (Observed, Verdict)> = BTreeMap::new();
    let mut retry_at: Option<Instant> = None;
    let mut written = Written::new();
    let mut warned = HashSet::new();
    let take = |w: Work, pending: &mut BTreeMap<_, _>, written: &mut Written| match w {
        Work::Judge { observed, verdict } => {
            pending.insert(observed.name.clone(), (observed, verdict));
        }
        Work::Forget(name) => {
            pending.remove(&name);
            written.remove(&name);
        }
    };
    loop {
        if pending.is_empty() {
            let retry = async {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                w = rx.recv() => match w {
                    Some(w) => take(w, &mut pending, &mut written),
                    None => return,
                },
                _ = retry => {
                    retry_at = None;
                    for (name, w) in std::mem::take(&mut failed) {
                        pending.entry(name).or_insert(w);
                    }
                }
            }
        }
        while let Ok(w) = rx.try_recv() {
            if let Work::Forget(name) = &w {
                failed.remove(name);
            }
            take(w, &mut pending, &mut written);
        }
        let Some((name, (o, verdict))) = pending.pop_first() else {
            continue;
        };
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let Some(want) = needed(&verdict, &o, &written, now) else {
            continue;
        };
        let mut metadata = serde_json::json!({"name": name});
        if let Some(uid) = &o.uid {
            // A precondition: never a condition meant for an object deleted since and
            // created again under its name.
            metadata["uid"] = serde_json::json!(uid);
        }
        let patch = serde_json::json!({
            "apiVersion": api::API_VERSION,
            "kind": api::KIND,
            "metadata": metadata,
            "status": {"conditions": [want]},
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        match api.patch_status(&name, &pp, &Patch::Apply(&patch)).await {
            Ok(_) => {
                debug!(policy = %name, status = %want.status, reason = %want.reason, "status written");
                warned.remove(&name);
                written.insert(name, (o.generation, want));
            }
            Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => {
                // Gone, or another object now: its own events bring the next judgement.
                debug!(policy = %name, error = %s, "status not written");
            }
            Err(e) => {
                if warned.insert(name.clone()) {
                    warn!(policy = %name, error = %e, "cannot write the policy's status; retrying");
                }
                failed.insert(name, (o, verdict));
                retry_at.get_or_insert_with(|| Instant::now() + RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::acceptance::Refusal;
    use super::*;

    fn at(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn observed(generation: i64, condition: Option<Condition>) -> Observed {
        Observed {
            name: "a".into(),
            uid: None,
            generation: Some(generation),
            condition,
        }
    }

    #[test]
    fn writes_only_what_changed_and_keeps_the_transition_time() {
        let ok = Verdict::Accepted { warnings: vec![] };
        let t0 = at("2026-01-01T00:00:00Z");
        let t1 = at("2026-01-02T00:00:00Z");
        let w = Written::new();
        let first = needed(&ok, &observed(1, None), &w, t0.clone()).expect("a first write");
        assert_eq!(
            (first.status.as_str(), first.reason.as_str()),
            ("True", "Accepted")
        );
        assert_eq!(first.observed_generation, Some(1));
        // The object carries it: nothing to write, however late.
        assert!(needed(&ok, &observed(1, Some(first.clone())), &w, t1.clone()).is_none());
        // A new generation, still accepted: written, the transition time kept.
        let next = needed(&ok, &observed(2, Some(first.clone())), &w, t1.clone()).unwrap();
        assert_eq!(next.last_transition_time, t0);
        let bad = Verdict::Refused {
            why: Refusal::Unsupported,
            message: "spec.egress[0].to[0].domainNames: not supported".into(),
            last_valid_in_force: true,
        };
        let refused = needed(&bad, &observed(3, Some(next)), &w, t1.clone()).unwrap();
        assert_eq!(
            (refused.status.as_str(), refused.reason.as_str()),
            ("False", "Unsupported")
        );
        assert_eq!(refused.last_transition_time, t1);
        assert!(refused.message.contains("domainNames"));
    }

    #[test]
    fn a_condition_written_once_is_not_fought_over() {
        let ok = Verdict::Accepted { warnings: vec![] };
        let t = at("2026-01-01T00:00:00Z");
        let mut w = Written::new();
        let mine = needed(&ok, &observed(1, None), &w, t.clone()).unwrap();
        w.insert("a".into(), (Some(1), mine.clone()));
        // Another replica (another version) wrote its own words over it.
        let mut theirs = mine.clone();
        theirs.message = "accepted (v2)".into();
        assert!(needed(&ok, &observed(1, Some(theirs.clone())), &w, t.clone()).is_none());
        // A new generation is a new judgement.
        assert!(needed(&ok, &observed(2, Some(theirs)), &w, t).is_some());
    }
}
