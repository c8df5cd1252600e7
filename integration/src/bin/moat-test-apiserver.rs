//! The test Kubernetes API server as a process, for server replicas in another network
//! namespace: started there (under `ip netns exec`), it listens on that namespace's
//! loopback, writes a kubeconfig (context `default`) to `--kubeconfig`, prints `ready`, and
//! then takes one command per line on stdin, answering `ok` or `error <why>`:
//!
//! - `sync FILE`: the API server holds exactly the Namespaces, Nodes, Pods and
//!   NetworkPolicies of FILE (multi-document YAML), as a directory source would: each object
//!   that changed is applied, each absent one deleted.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;

use clap::Parser;
use moat_integration::kubeapi::{ApiServer, Kind, Options};
use serde_json::Value;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    kubeconfig: PathBuf,
}

type Key = (Kind, String, String);

fn key(v: &Value) -> Option<Key> {
    let kind = Kind::of(v)?;
    let meta = &v["metadata"];
    let ns = if kind.namespaced() {
        meta["namespace"].as_str().unwrap_or("default")
    } else {
        ""
    };
    Some((kind, ns.to_string(), meta["name"].as_str()?.to_string()))
}

fn sync(api: &ApiServer, held: &mut BTreeMap<Key, Value>, file: &str) -> Result<usize, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    let mut want = BTreeMap::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).map_err(|e| e.to_string())?;
        if v.is_null() {
            continue;
        }
        let k = key(&v).ok_or_else(|| format!("not an object served here: {v}"))?;
        want.insert(k, v);
    }
    let mut changed = 0;
    for (k, v) in &want {
        if held.get(k) != Some(v) {
            api.apply(v.clone());
            changed += 1;
        }
    }
    for k in held.keys().filter(|k| !want.contains_key(*k)) {
        api.delete(k.0, &k.1, &k.2);
        changed += 1;
    }
    *held = want;
    Ok(changed)
}

fn main() {
    let args = Args::parse();
    let api = ApiServer::start(Options {
        page_size: 500,
        ..Options::default()
    });
    api.kubeconfig(&args.kubeconfig, "default");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    let mut held = BTreeMap::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let answer = match line.split_once(' ') {
            Some(("sync", file)) => match sync(&api, &mut held, file.trim()) {
                Ok(n) => format!("ok {n}"),
                Err(e) => format!("error {e}"),
            },
            _ => format!("error unknown command {line:?}"),
        };
        let _ = writeln!(out, "{answer}");
        let _ = out.flush();
    }
}
