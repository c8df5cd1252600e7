//! The file source: a directory of manifests, reloaded when it changes.
//!
//! inotify (through `notify`) triggers a reload after a short debounce, so an editor's
//! write-rename dance becomes one reload; a slow poll catches anything the watcher missed
//! (network filesystems, a watcher that failed to start).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use moat_manifests::{ManifestSet, Reload, Severity};
use notify::{RecursiveMode, Watcher};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::SourceEvent;

const DEBOUNCE: Duration = Duration::from_millis(150);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Manifests(#[from] moat_manifests::Error),
}

/// Loads `dir` once (failing if it can't be read at all), sends the full state as a
/// `Reset`, then keeps sending changes until the receiver goes away.
pub async fn spawn(
    dir: PathBuf,
    tx: mpsc::Sender<SourceEvent>,
    poll: Duration,
    reloads: Counter,
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
    let mut set = ManifestSet::new(dir.clone());
    let first = set.reload()?;
    let mut shown = report(&first, &BTreeSet::new());
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
