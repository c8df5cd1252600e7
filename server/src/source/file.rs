//! The file source: a directory of manifests, reloaded when it changes.
//!
//! inotify (through `notify`) triggers a reload after a short debounce, so an editor's
//! write-rename dance becomes one reload; a slow poll catches anything the watcher missed
//! (network filesystems, a watcher that failed to start).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use moat_manifests::{Diagnostic, ManifestSet, Reload, Severity};
use moat_policy::model::ObjectKey;
use moat_policy::model::parse::{self, ValidationError};
use notify::{RecursiveMode, Watcher};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::SourceEvent;
use super::acceptance::{Acceptance, Refusal, Verdict};

const DEBOUNCE: Duration = Duration::from_millis(150);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Manifests(#[from] moat_manifests::Error),
}

/// [`spawn_judged`] with a verdict record nobody reads.
pub async fn spawn(
    dir: PathBuf,
    tx: mpsc::Sender<SourceEvent>,
    poll: Duration,
    reloads: Counter,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    spawn_judged(
        dir,
        tx,
        poll,
        reloads,
        Arc::default(),
        parse::Options::default(),
    )
    .await
}

/// Loads `dir` once (failing if it can't be read at all), sends the full state as a
/// `Reset`, then keeps sending changes until the receiver goes away. After every load,
/// `acceptance` holds a verdict on each policy the directory names (the cluster's
/// `Health::acceptance`, read by `moatctl status --policy`). Objects are validated with
/// `parse` (experimental ClusterNetworkPolicy peers).
pub async fn spawn_judged(
    dir: PathBuf,
    tx: mpsc::Sender<SourceEvent>,
    poll: Duration,
    reloads: Counter,
    acceptance: Arc<Acceptance>,
    parse: parse::Options,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    // Watch before the first load: a change landing between the load and the watch would
    // otherwise wait for the slow poll.
    let (wake_tx, mut wake) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Only changes count: our own reload opens and reads every file, and reacting to
        // those access events would reload forever.
        if res.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = wake_tx.try_send(());
        }
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::Recursive).map(|_| w));
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, poll = ?poll, "cannot watch the directory; polling only");
            None
        }
    };
    let mut set = ManifestSet::with_options(dir.clone(), parse);
    let first = set.reload()?;
    let mut shown = report(&first, &BTreeSet::new());
    judge(&set, &first, &acceptance);
    info!(dir = %dir.display(), objects = set.len(), "loaded manifests");
    let objects = set.objects().cloned().collect();
    let span = info_span!("source", dir = %dir.display());
    Ok(tokio::spawn(
        async move {
            let _watcher = watcher;
            if tx.send(SourceEvent::Reset(objects)).await.is_err() {
                return;
            }
            let mut tick = tokio::time::interval(poll);
            tick.tick().await;
            loop {
                tokio::select! {
                    Some(()) = wake.recv() => {
                        tokio::time::sleep(DEBOUNCE).await;
                        while wake.try_recv().is_ok() {}
                    }
                    _ = tick.tick() => {}
                    _ = tx.closed() => return,
                }
                reloads.inc();
                match set.reload() {
                    Ok(r) => {
                        shown = report(&r, &shown);
                        judge(&set, &r, &acceptance);
                        if !r.events.is_empty() {
                            debug!(events = r.events.len(), "manifests changed");
                            if tx.send(SourceEvent::Batch(r.events)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => error!(error = %e, "reload failed; keeping the last state"),
                }
            }
        }
        .instrument(span),
    ))
}

/// Logs diagnostics that weren't shown last time (a poll mustn't repeat every warning).
fn report(r: &Reload, shown: &BTreeSet<String>) -> BTreeSet<String> {
    let now: BTreeSet<String> = r.diagnostics.iter().map(ToString::to_string).collect();
    for d in &r.diagnostics {
        let text = d.to_string();
        if shown.contains(&text) {
            continue;
        }
        match d.severity {
            Severity::Error => error!("{text}"),
            Severity::Warning => warn!("{text}"),
        }
    }
    now
}

/// Replaces every verdict with this load's: each policy in the directory is refused (its
/// text invalid, with the diagnostic's file, object and field as the message) or accepted
/// (its other diagnostics as warnings). A file that could not be read at all names no
/// object, so what it held before keeps its verdict's place as accepted.
fn judge(set: &ManifestSet, r: &Reload, acceptance: &Acceptance) {
    let policy =
        |k: &ObjectKey| matches!(k, ObjectKey::Policy { .. } | ObjectKey::ClusterPolicy(_));
    let held: HashSet<ObjectKey> = set.objects().map(|o| o.key()).collect();
    let mut verdicts: HashMap<ObjectKey, Verdict> = held
        .iter()
        .filter(|k| policy(k))
        .map(|k| (k.clone(), Verdict::Accepted { warnings: vec![] }))
        .collect();
    for k in r.rejected.iter().filter(|k| policy(k)) {
        let errors: Vec<&Diagnostic> = r
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error && d.key.as_ref() == Some(k))
            .collect();
        // Refused whole for an unsupported peer only when nothing else is wrong with it.
        let why = if !errors.is_empty() && errors.iter().all(|d| refusal(d) == Refusal::Unsupported)
        {
            Refusal::Unsupported
        } else {
            Refusal::Invalid
        };
        let message = errors
            .iter()
            .map(|d| d.located())
            .collect::<Vec<_>>()
            .join("; ");
        verdicts.insert(
            k.clone(),
            Verdict::Refused {
                why,
                message,
                last_valid_in_force: held.contains(k),
            },
        );
    }
    for d in &r.diagnostics {
        if let Some(Verdict::Accepted { warnings }) =
            d.key.as_ref().and_then(|k| verdicts.get_mut(k))
        {
            warnings.push(d.located());
        }
    }
    acceptance.remove_unless(|k| verdicts.contains_key(k));
    for (k, v) in verdicts {
        acceptance.set(k, v);
    }
}

fn refusal(d: &Diagnostic) -> Refusal {
    Refusal::of(&ValidationError {
        object: d.object.clone().unwrap_or_default(),
        field: d.field.clone().unwrap_or_default(),
        message: d.message.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits until the counter has been still for `quiet`, returning its value.
    async fn settled(c: &Counter, quiet: Duration) -> u64 {
        loop {
            let before = c.get();
            tokio::time::sleep(quiet).await;
            if c.get() == before {
                return before;
            }
        }
    }

    fn cnp(name: &str, priority: u32, peer: &str) -> String {
        format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: Admin\n  priority: {priority}\n  subject: {{namespaces: {{}}}}\n  egress:\n  - action: Deny\n    to: [{peer}]\n"
        )
    }

    #[test]
    fn every_policy_of_the_directory_gets_a_verdict() {
        let dir = tempfile::tempdir().unwrap();
        let write = |f: &str, text: &str| std::fs::write(dir.path().join(f), text).unwrap();
        write("guard.yaml", &cnp("guard", 5, "{networks: [10.0.0.0/8]}"));
        write(
            "never.yaml",
            &cnp("never", 5000, "{networks: [10.0.0.0/8]}"),
        );
        write(
            "np.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.1.2.3/8}}]\n",
        );
        let mut set = ManifestSet::new(dir.path());
        let a = Acceptance::default();
        let load = |set: &mut ManifestSet| {
            let r = set.reload().unwrap();
            judge(set, &r, &a);
        };
        load(&mut set);
        let guard = ObjectKey::ClusterPolicy("guard".into());
        let never = ObjectKey::ClusterPolicy("never".into());
        assert_eq!(a.get(&guard), Some(Verdict::Accepted { warnings: vec![] }));
        match a.get(&never).unwrap() {
            Verdict::Refused {
                why: Refusal::Invalid,
                message,
                last_valid_in_force: false,
            } => assert!(
                message.contains("never.yaml: ClusterNetworkPolicy never: spec.priority"),
                "{message}"
            ),
            v => panic!("{v:?}"),
        }
        let np = ObjectKey::Policy {
            namespace: "shop".into(),
            name: "a".into(),
        };
        match a.get(&np).unwrap() {
            Verdict::Accepted { warnings } => {
                assert!(warnings[0].contains("host bits set"), "{warnings:?}")
            }
            v => panic!("{v:?}"),
        }

        // An unsupported peer in a policy that was valid: its last version stays.
        write(
            "guard.yaml",
            &cnp("guard", 5, "{domainNames: [example.com]}"),
        );
        std::fs::remove_file(dir.path().join("never.yaml")).unwrap();
        load(&mut set);
        match a.get(&guard).unwrap() {
            Verdict::Refused {
                why: Refusal::Unsupported,
                message,
                last_valid_in_force: true,
            } => assert!(message.contains("domainNames"), "{message}"),
            v => panic!("{v:?}"),
        }
        assert_eq!(
            a.get(&never),
            None,
            "a removed file's policy keeps a verdict"
        );
    }

    #[test]
    fn nodes_peers_are_refused_as_unsupported_unless_the_flag_is_on() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("guard.yaml"),
            cnp("guard", 5, "{nodes: {matchLabels: {pool: infra}}}"),
        )
        .unwrap();
        let guard = ObjectKey::ClusterPolicy("guard".into());
        let a = Acceptance::default();
        let mut off = ManifestSet::new(dir.path());
        let r = off.reload().unwrap();
        judge(&off, &r, &a);
        match a.get(&guard).unwrap() {
            Verdict::Refused {
                why: Refusal::Unsupported,
                message,
                last_valid_in_force: false,
            } => assert!(
                message.contains("spec.egress[0].to[0].nodes")
                    && message.contains("--experimental-cnp-node-peers"),
                "{message}"
            ),
            v => panic!("{v:?}"),
        }
        let on = parse::Options {
            experimental_cnp_node_peers: true,
        };
        let mut set = ManifestSet::with_options(dir.path(), on);
        let r = set.reload().unwrap();
        judge(&set, &r, &a);
        assert_eq!(a.get(&guard), Some(Verdict::Accepted { warnings: vec![] }));
    }

    #[tokio::test]
    async fn reloads_once_per_change_and_never_on_its_own_reads() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ns.yaml");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let reloads = Counter::default();
        let _task = spawn(
            dir.path().into(),
            tx,
            Duration::from_secs(3600),
            reloads.clone(),
        )
        .await
        .unwrap();
        assert!(matches!(rx.recv().await, Some(SourceEvent::Reset(o)) if o.len() == 1));
        // Idle: reading the files must not wake the watcher.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(reloads.get(), 0, "reloaded without any change");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
        )
        .unwrap();
        assert!(matches!(rx.recv().await, Some(SourceEvent::Batch(_))));
        let after_change = settled(&reloads, Duration::from_millis(600)).await;
        assert!(
            (1..=2).contains(&after_change),
            "{after_change} reloads for one write"
        );
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            reloads.get(),
            after_change,
            "reloads kept coming after the change"
        );
    }
}
