//! The test API server's object store: objects with resource versions, the event history
//! watches resume from, compaction, and consistent paginated lists.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

/// The kinds Moat watches (ClusterNetworkPolicy only while its CRD is installed), and the
/// ConfigMaps its replicas coordinate through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    NetworkPolicy,
    ConfigMap,
    ClusterNetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::NetworkPolicy,
        Kind::ConfigMap,
        Kind::ClusterNetworkPolicy,
    ];

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            Kind::ClusterNetworkPolicy => "policy.networking.k8s.io/v1alpha2",
            _ => "v1",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::ConfigMap => "ConfigMap",
            Kind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        }
    }

    /// The collection path of every object of this kind (all namespaces).
    pub fn collection(self) -> &'static str {
        match self {
            Kind::Namespace => "/api/v1/namespaces",
            Kind::Node => "/api/v1/nodes",
            Kind::Pod => "/api/v1/pods",
            Kind::NetworkPolicy => "/apis/networking.k8s.io/v1/networkpolicies",
            Kind::ConfigMap => "/api/v1/configmaps",
            Kind::ClusterNetworkPolicy => {
                "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies"
            }
        }
    }

    pub fn of(v: &Value) -> Option<Kind> {
        match v.get("kind")?.as_str()? {
            "Namespace" => Some(Kind::Namespace),
            "Node" => Some(Kind::Node),
            "Pod" => Some(Kind::Pod),
            "NetworkPolicy" => Some(Kind::NetworkPolicy),
            "ConfigMap" => Some(Kind::ConfigMap),
            "ClusterNetworkPolicy" => Some(Kind::ClusterNetworkPolicy),
            _ => None,
        }
    }

    /// The path segment of the kind in a namespace (`/api/v1/namespaces/NS/<plural>`).
    pub fn plural(self) -> &'static str {
        self.collection().rsplit('/').next().expect("a path")
    }

    pub fn namespaced(self) -> bool {
        matches!(self, Kind::Pod | Kind::NetworkPolicy | Kind::ConfigMap)
    }

    /// A CRD with the status subresource: the main resource ignores `status` and counts
    /// spec changes in `metadata.generation`; `/status` writes status only.
    pub fn has_status_subresource(self) -> bool {
        self == Kind::ClusterNetworkPolicy
    }
}

pub type Key = (Kind, String, String);

/// One change, as a watch delivers it.
#[derive(Clone, Debug)]
pub struct Change {
    pub rv: u64,
    pub kind: Kind,
    pub typ: &'static str,
    pub object: Value,
}

impl Change {
    pub fn line(&self) -> Vec<u8> {
        event_line(self.typ, &self.object)
    }
}

/// One watch event as the API server streams it: a JSON object and a newline.
pub fn event_line(typ: &str, object: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(&json!({"type": typ, "object": object})).expect("event json");
    b.push(b'\n');
    b
}

/// Why a create or an update was refused, as the API server says it.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// 409 `AlreadyExists`: a create of a name that is taken.
    Exists,
    /// 409 `Conflict`: an update whose `metadata.resourceVersion` is not the stored one.
    Conflict { stored: u64 },
    /// 404 `NotFound`: an update of nothing.
    Missing,
}

/// A list's namespace and equality label selector (`a=b,c=d`).
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub namespace: Option<String>,
    pub labels: Vec<(String, String)>,
}

impl Selection {
    /// `None` for a selector this server does not speak (set-based, `!=`).
    pub fn parse(namespace: Option<&str>, selector: Option<&str>) -> Option<Selection> {
        let mut labels = Vec::new();
        for term in selector.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            let (k, v) = term.split_once('=')?;
            if k.ends_with('!') || v.starts_with('=') {
                return None;
            }
            labels.push((k.to_string(), v.to_string()));
        }
        Some(Selection {
            namespace: namespace.map(str::to_string),
            labels,
        })
    }

    pub fn selects(&self, v: &Value) -> bool {
        let meta = &v["metadata"];
        self.namespace
            .as_deref()
            .is_none_or(|ns| meta["namespace"].as_str() == Some(ns))
            && self
                .labels
                .iter()
                .all(|(k, want)| meta["labels"][k].as_str() == Some(want))
    }
}

/// A continue token that names no list in progress (compacted, or never issued).
#[derive(Debug)]
pub struct Expired;

/// A list in progress: the snapshot its pages come from.
struct Page {
    rv: u64,
    kind: Kind,
    items: Arc<Vec<Value>>,
}

pub struct Objects {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    /// Watches from a resource version below this get `410 Gone`.
    compacted: u64,
    pages: HashMap<u64, Page>,
    next_page: u64,
    uid: u64,
    pub events: broadcast::Sender<Change>,
}

/// History kept for resuming watches (like etcd's compaction window, in events).
const HISTORY: usize = 200_000;

impl Default for Objects {
    fn default() -> Self {
        Objects {
            rv: 1000,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted: 0,
            pages: HashMap::new(),
            next_page: 1,
            uid: 0,
            events: broadcast::channel(1 << 16).0,
        }
    }
}

pub fn key_of(kind: Kind, v: &Value) -> Result<Key, String> {
    let meta = v.get("metadata").ok_or("no metadata")?;
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .ok_or("no metadata.name")?;
    let ns = if kind.namespaced() {
        meta.get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
    } else {
        ""
    };
    Ok((kind, ns.to_string(), name.to_string()))
}

impl Objects {
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// Creates or replaces an object, as `kubectl apply` would end up. Returns the stored
    /// object (with uid and resourceVersion).
    pub fn apply(&mut self, mut v: Value) -> Result<Value, String> {
        let kind = Kind::of(&v).ok_or("unknown kind")?;
        let key = key_of(kind, &v)?;
        self.rv += 1;
        let old_uid = self
            .objects
            .get(&key)
            .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string));
        let uid = match old_uid {
            Some(u) => u,
            None => match v["metadata"]["uid"].as_str() {
                Some(u) => u.to_string(),
                None => {
                    self.uid += 1;
                    format!("00000000-0000-4000-8000-{:012x}", self.uid)
                }
            },
        };
        v["apiVersion"] = json!(kind.api_version());
        if kind.has_status_subresource() {
            let stored = self.objects.get(&key);
            let generation = match stored {
                None => 1,
                Some(o) => {
                    let g = o["metadata"]["generation"].as_i64().unwrap_or(1);
                    let changed = o.get("spec") != v.get("spec");
                    g + i64::from(changed)
                }
            };
            v["metadata"]["generation"] = json!(generation);
            match stored.and_then(|o| o.get("status")).cloned() {
                Some(st) => v["status"] = st,
                None => {
                    if let Some(m) = v.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        let meta = &mut v["metadata"];
        meta["uid"] = json!(uid);
        meta["resourceVersion"] = json!(self.rv.to_string());
        if kind.namespaced() {
            meta["namespace"] = json!(key.1);
        }
        let typ = if self.objects.insert(key, v.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(kind, typ, v.clone());
        Ok(v)
    }

    /// `POST`: creates, refusing a name that exists.
    pub fn create(&mut self, v: Value) -> Result<Value, Refused> {
        let kind = Kind::of(&v).ok_or(Refused::Missing)?;
        let key = key_of(kind, &v).map_err(|_| Refused::Missing)?;
        if self.objects.contains_key(&key) {
            return Err(Refused::Exists);
        }
        self.apply(v).map_err(|_| Refused::Missing)
    }

    /// `PUT`: replaces, with optimistic concurrency: a `metadata.resourceVersion` that is
    /// not the stored object's is a conflict (none given: unconditional, as the API allows).
    pub fn update(&mut self, v: Value) -> Result<Value, Refused> {
        let kind = Kind::of(&v).ok_or(Refused::Missing)?;
        let key = key_of(kind, &v).map_err(|_| Refused::Missing)?;
        let stored = self.objects.get(&key).ok_or(Refused::Missing)?;
        let stored_rv: u64 = stored["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        if let Some(given) = v["metadata"]["resourceVersion"].as_str()
            && given.parse::<u64>().ok() != Some(stored_rv)
        {
            return Err(Refused::Conflict { stored: stored_rv });
        }
        self.apply(v).map_err(|_| Refused::Missing)
    }

    /// `PATCH …/{name}/status`: only `status` changes. `apply` (server-side apply) merges
    /// `status.conditions` as the `listType=map` keyed by `type` it is (an entry of the
    /// patch replaces the entry of its type, others stay); otherwise `status` is JSON
    /// merge-patched (lists replaced whole). A `metadata.uid` in the patch is a
    /// precondition, as the API server treats it.
    pub fn patch_status(
        &mut self,
        kind: Kind,
        name: &str,
        patch: &Value,
        apply: bool,
    ) -> Result<Value, Refused> {
        let key = (kind, String::new(), name.to_string());
        let stored = self.objects.get(&key).ok_or(Refused::Missing)?;
        if let Some(uid) = patch["metadata"]["uid"].as_str()
            && stored["metadata"]["uid"].as_str() != Some(uid)
        {
            let stored_rv = stored["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            return Err(Refused::Conflict { stored: stored_rv });
        }
        let mut v = stored.clone();
        let given = patch.get("status").cloned().unwrap_or(Value::Null);
        if apply {
            let mut conditions: Vec<Value> = v["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for c in given["conditions"].as_array().into_iter().flatten() {
                match conditions.iter_mut().find(|x| x["type"] == c["type"]) {
                    Some(x) => *x = c.clone(),
                    None => conditions.push(c.clone()),
                }
            }
            v["status"]["conditions"] = json!(conditions);
        } else {
            merge_patch(&mut v["status"], &given);
        }
        self.rv += 1;
        v["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects.insert(key, v.clone());
        self.record(kind, "MODIFIED", v.clone());
        Ok(v)
    }

    pub fn delete(&mut self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let mut v = self
            .objects
            .remove(&(kind, ns.to_string(), name.to_string()))?;
        self.rv += 1;
        v["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(kind, "DELETED", v.clone());
        Some(v)
    }

    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(kind, ns.to_string(), name.to_string()))
    }

    fn record(&mut self, kind: Kind, typ: &'static str, object: Value) {
        let c = Change {
            rv: self.rv,
            kind,
            typ,
            object,
        };
        self.history.push_back(c.clone());
        while self.history.len() > HISTORY {
            let gone = self.history.pop_front().expect("non-empty");
            self.compacted = gone.rv + 1;
        }
        let _ = self.events.send(c);
    }

    /// Forgets all history: every watch resuming from before now gets `410 Gone`, and
    /// every list in progress has an expired continue token.
    pub fn compact(&mut self) {
        self.rv += 1;
        self.compacted = self.rv;
        self.history.clear();
        self.pages.clear();
    }

    pub fn items(&self, kind: Kind) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, _)| k.0 == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// One page of a list: `(items, resourceVersion, continue)`. `Err` = expired token.
    pub fn list(
        &mut self,
        kind: Kind,
        limit: Option<usize>,
        token: Option<&str>,
    ) -> Result<(Vec<Value>, u64, Option<String>), Expired> {
        self.list_in(kind, &Selection::default(), limit, token)
    }

    /// [`Objects::list`] of what `sel` selects (its filter applies before pagination, as
    /// the API server's does).
    pub fn list_in(
        &mut self,
        kind: Kind,
        sel: &Selection,
        limit: Option<usize>,
        token: Option<&str>,
    ) -> Result<(Vec<Value>, u64, Option<String>), Expired> {
        let (id, offset) = match token {
            Some(t) => {
                let (id, off) = t.split_once('-').ok_or(Expired)?;
                let id: u64 = id.parse().map_err(|_| Expired)?;
                let off: usize = off.parse().map_err(|_| Expired)?;
                if self.pages.get(&id).is_none_or(|p| p.kind != kind) {
                    return Err(Expired);
                }
                (id, off)
            }
            None => {
                let id = self.next_page;
                self.next_page += 1;
                let mut items = self.items(kind);
                items.retain(|v| sel.selects(v));
                let items = Arc::new(items);
                self.pages.insert(
                    id,
                    Page {
                        rv: self.rv,
                        kind,
                        items,
                    },
                );
                (id, 0)
            }
        };
        let page = &self.pages[&id];
        let (rv, all) = (page.rv, page.items.clone());
        let end = limit.map_or(all.len(), |l| (offset + l.max(1)).min(all.len()));
        let items = all[offset.min(all.len())..end].to_vec();
        let next = if end < all.len() {
            Some(format!("{id}-{end}"))
        } else {
            self.pages.remove(&id);
            None
        };
        Ok((items, rv, next))
    }

    /// Changes of `kind` after `rv`, and a receiver for the ones after those; `Err` = too old.
    pub fn since(
        &self,
        kind: Kind,
        rv: u64,
    ) -> Result<(Vec<Change>, broadcast::Receiver<Change>), u64> {
        if rv < self.compacted {
            return Err(self.compacted);
        }
        let past = self
            .history
            .iter()
            .filter(|c| c.rv > rv && c.kind == kind)
            .cloned()
            .collect();
        Ok((past, self.events.subscribe()))
    }
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// A `Status` object (the body of every API error).
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> Value {
        json!({"kind": "Pod", "metadata": {"name": name, "namespace": "a"}})
    }

    #[test]
    fn pages_come_from_one_snapshot_and_expire_on_compaction() {
        let mut o = Objects::default();
        for i in 0..5 {
            o.apply(pod(&format!("p{i}"))).unwrap();
        }
        let (page, rv, next) = o.list(Kind::Pod, Some(2), None).unwrap();
        assert_eq!(page.len(), 2);
        o.apply(pod("late")).unwrap();
        let (p2, rv2, next2) = o.list(Kind::Pod, Some(2), next.as_deref()).unwrap();
        let (p3, _, next3) = o.list(Kind::Pod, Some(2), next2.as_deref()).unwrap();
        assert_eq!((rv2, p2.len(), p3.len(), next3), (rv, 2, 1, None));
        let (_, _, next) = o.list(Kind::Pod, Some(2), None).unwrap();
        o.compact();
        assert!(o.list(Kind::Pod, Some(2), next.as_deref()).is_err());
    }

    #[test]
    fn updates_are_optimistic_and_creates_refuse_taken_names() {
        let cm = |rv: Option<&str>, n: u32| {
            let mut v = json!({"kind": "ConfigMap", "metadata": {"name": "c", "namespace": "m"},
                "data": {"next": n.to_string()}});
            if let Some(rv) = rv {
                v["metadata"]["resourceVersion"] = json!(rv);
            }
            v
        };
        let mut o = Objects::default();
        let first = o.create(cm(None, 1)).unwrap();
        assert_eq!(o.create(cm(None, 1)), Err(Refused::Exists));
        let rv = first["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        let second = o.update(cm(Some(&rv), 2)).unwrap();
        // The loser of a race read the same version: refused, with nothing changed.
        let stored = second["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            o.update(cm(Some(&rv), 3)),
            Err(Refused::Conflict { stored })
        );
        assert_eq!(
            o.get(Kind::ConfigMap, "m", "c").unwrap()["data"]["next"],
            "2"
        );
        let mut other = cm(None, 1);
        other["metadata"]["name"] = json!("d");
        assert_eq!(o.update(other), Err(Refused::Missing));
    }

    #[test]
    fn a_status_subresource_counts_spec_changes_and_merges_conditions_by_type() {
        let cnp = |prio: u32| {
            json!({"kind": "ClusterNetworkPolicy", "metadata": {"name": "c"},
                "spec": {"tier": "Admin", "priority": prio}, "status": {"conditions": []}})
        };
        let mut o = Objects::default();
        let first = o.apply(cnp(1)).unwrap();
        assert_eq!(first["metadata"]["generation"], 1);
        assert!(first.get("status").is_none(), "a create sets no status");
        let cond = |t: &str, s: &str| json!({"type": t, "status": s});
        let k = Kind::ClusterNetworkPolicy;
        let patch = |c: Value| json!({"status": {"conditions": [c]}});
        o.patch_status(k, "c", &patch(cond("other.io/Ready", "True")), true)
            .unwrap();
        let v = o
            .patch_status(k, "c", &patch(cond("moat.io/Accepted", "True")), true)
            .unwrap();
        assert_eq!(v["status"]["conditions"].as_array().unwrap().len(), 2);
        let v = o
            .patch_status(k, "c", &patch(cond("moat.io/Accepted", "False")), true)
            .unwrap();
        let conds = v["status"]["conditions"].as_array().unwrap();
        assert_eq!(conds.len(), 2);
        assert_eq!(conds[1]["status"], "False");
        assert_eq!(v["metadata"]["generation"], 1, "status is no generation");
        // The main resource keeps status, and counts spec changes only.
        assert_eq!(o.apply(cnp(1)).unwrap()["metadata"]["generation"], 1);
        let v = o.apply(cnp(2)).unwrap();
        assert_eq!(v["metadata"]["generation"], 2);
        assert_eq!(v["status"]["conditions"].as_array().unwrap().len(), 2);
        let wrong = json!({"metadata": {"uid": "not-it"}, "status": {}});
        assert!(matches!(
            o.patch_status(k, "c", &wrong, true),
            Err(Refused::Conflict { .. })
        ));
        assert_eq!(
            o.patch_status(k, "nope", &patch(cond("a", "True")), true),
            Err(Refused::Missing)
        );
    }

    #[test]
    fn watches_resume_from_history_until_compacted() {
        let mut o = Objects::default();
        o.apply(pod("a")).unwrap();
        let rv = o.rv();
        o.apply(pod("b")).unwrap();
        o.delete(Kind::Pod, "a", "a").unwrap();
        let (past, _) = o.since(Kind::Pod, rv).unwrap();
        let types: Vec<_> = past.iter().map(|c| c.typ).collect();
        assert_eq!(types, ["ADDED", "DELETED"]);
        o.compact();
        assert!(o.since(Kind::Pod, rv).is_err());
        assert!(o.since(Kind::Pod, o.rv()).is_ok());
    }
}
