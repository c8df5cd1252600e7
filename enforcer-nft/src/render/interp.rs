//! A model of the kernel's table, built from the very commands `render` emits and evaluated
//! on packets as `nf_tables` evaluates them: rules in order, expressions left to right, a
//! failed match or lookup ending the rule, `jump` pushing a return point and `goto` not,
//! `return` (or a chain's end) popping one, and the base chain's policy when none is left.
//! Batches apply as the kernel applies them: deleting a missing object or re-adding an
//! element with other data fails the batch. Anything the model doesn't know panics, so a
//! new kind of rule can't slip past the tests unmodelled.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Value, json};

/// One key component: an inclusive range (an exact value is a range of one).
type Field = (u128, u128);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Set {
    /// A map (its elements carry data).
    map: bool,
    /// Key → data (maps), in no particular order.
    elems: BTreeMap<Vec<Field>, Option<Value>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub sets: BTreeMap<String, Set>,
    pub chains: BTreeMap<String, Vec<Vec<Value>>>,
    /// Base chains' policies.
    pub policies: BTreeMap<String, bool>,
    pub counters: BTreeMap<String, u64>,
}

/// A new flow as the forward hook sees it.
#[derive(Clone, Copy, Debug)]
pub struct Packet {
    pub iif: u32,
    pub oif: u32,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub port: u16,
}

fn num(v: &Value) -> u128 {
    match v {
        Value::Number(n) => u128::from(n.as_u64().expect("unsigned")),
        Value::String(s) => match s.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => u128::from(u32::from(a)),
            Ok(IpAddr::V6(a)) => u128::from(a),
            Err(_) => s.parse().unwrap_or_else(|_| panic!("value {s}")),
        },
        other => panic!("value {other}"),
    }
}

fn field(v: &Value) -> Field {
    match v.get("range") {
        Some(r) => (num(&r[0]), num(&r[1])),
        None => (num(v), num(v)),
    }
}

fn key(v: &Value) -> Vec<Field> {
    match v.get("concat") {
        Some(parts) => parts.as_array().unwrap().iter().map(field).collect(),
        None => vec![field(v)],
    }
}

/// (key, data) of one element as rendered.
fn element(v: &Value, map: bool) -> (Vec<Field>, Option<Value>) {
    if map {
        let pair = v.as_array().expect("a map element is [key, data]");
        return (key(&pair[0]), Some(pair[1].clone()));
    }
    match v.get("elem") {
        Some(inner) => (key(&inner["val"]), None),
        None => (key(v), None),
    }
}

impl Table {
    /// What differs between two tables' content (counters' values aside), for messages;
    /// empty when they hold the same.
    pub fn differences(&self, other: &Table) -> Vec<String> {
        let mut out = Vec::new();
        let names = |a: &BTreeMap<String, u64>| a.keys().cloned().collect::<Vec<_>>();
        if names(&self.counters) != names(&other.counters) {
            out.push("counters".into());
        }
        if self.policies != other.policies {
            out.push("policies".into());
        }
        for (k, v) in &self.sets {
            match other.sets.get(k) {
                Some(o) if o == v => {}
                Some(o) => out.push(format!(
                    "set {k}: only in the first {:?}, only in the second {:?}",
                    v.elems
                        .iter()
                        .filter(|e| o.elems.get(e.0) != Some(e.1))
                        .collect::<Vec<_>>(),
                    o.elems
                        .iter()
                        .filter(|e| v.elems.get(e.0) != Some(e.1))
                        .collect::<Vec<_>>()
                )),
                None => out.push(format!("set {k} only in the first")),
            }
        }
        out.extend(
            other
                .sets
                .keys()
                .filter(|k| !self.sets.contains_key(*k))
                .map(|k| format!("set {k} only in the second")),
        );
        for (k, v) in &self.chains {
            if other.chains.get(k) != Some(v) {
                out.push(format!("chain {k}"));
            }
        }
        out.extend(
            other
                .chains
                .keys()
                .filter(|k| !self.chains.contains_key(*k))
                .map(|k| format!("chain {k} only in the second")),
        );
        out
    }

    /// Applies one batch; `Err` (and the table unchanged) where the kernel would refuse it.
    pub fn apply(&mut self, batch: &[Value]) -> Result<(), String> {
        let mut next = self.clone();
        for c in batch {
            next.command(c)?;
        }
        *self = next;
        Ok(())
    }

    fn command(&mut self, c: &Value) -> Result<(), String> {
        let (verb, body) = c.as_object().unwrap().iter().next().unwrap();
        let (kind, o) = body.as_object().unwrap().iter().next().unwrap();
        let name = o["name"].as_str().unwrap_or_default().to_string();
        match (verb.as_str(), kind.as_str()) {
            ("add", "table") => {}
            ("delete", "table") => *self = Table::default(),
            ("add", "counter") => {
                self.counters.entry(name).or_default();
            }
            ("add", "set" | "map") => {
                self.sets.entry(name).or_insert(Set {
                    map: kind == "map",
                    elems: BTreeMap::new(),
                });
            }
            ("delete", "set" | "map") => {
                // The kernel refuses to delete a set a rule still looks up.
                let used = format!("\"@{name}\"");
                if self.rules_text().contains(&used) {
                    return Err(format!("set {name} in use"));
                }
                self.sets.remove(&name).ok_or(format!("no set {name}"))?;
            }
            ("flush", "set" | "map") => self
                .sets
                .get_mut(&name)
                .ok_or(format!("no set {name}"))?
                .elems
                .clear(),
            ("add", "chain") => {
                self.chains.entry(name.clone()).or_default();
                if let Some(p) = o.get("policy") {
                    self.policies.insert(name, p == "accept");
                }
            }
            ("delete", "chain") => {
                // ... or a chain a rule or a verdict map element still jumps to.
                let target = json!({"target": name}).to_string();
                let in_maps = self.sets.values().flat_map(|s| s.elems.values()).flatten();
                if self.rules_text().contains(&target)
                    || in_maps.map(Value::to_string).any(|d| d.contains(&target))
                {
                    return Err(format!("chain {name} in use"));
                }
                self.chains
                    .remove(&name)
                    .ok_or(format!("no chain {name}"))?;
            }
            ("flush", "chain") => self
                .chains
                .get_mut(&name)
                .ok_or(format!("no chain {name}"))?
                .clear(),
            ("add", "rule") => {
                let chain = o["chain"].as_str().unwrap();
                self.chains
                    .get_mut(chain)
                    .ok_or(format!("no chain {chain}"))?
                    .push(o["expr"].as_array().unwrap().clone());
            }
            ("add" | "delete", "element") => {
                let chains: Vec<String> = self.chains.keys().cloned().collect();
                let set = self.sets.get_mut(&name).ok_or(format!("no set {name}"))?;
                let map = set.map;
                for e in o["elem"].as_array().unwrap() {
                    let (k, data) = element(e, map);
                    if verb == "add" {
                        if let Some(t) = data.as_ref().and_then(|d| d.get("goto").or(d.get("jump")))
                        {
                            let t = t["target"].as_str().unwrap();
                            if !chains.iter().any(|c| c == t) {
                                return Err(format!("{name}: no chain {t}"));
                            }
                        }
                        match set.elems.get(&k) {
                            Some(d) if *d != data => return Err(format!("{name}: busy {e}")),
                            _ => {
                                set.elems.insert(k, data);
                            }
                        }
                    } else if set.elems.remove(&k).is_none() {
                        return Err(format!("{name}: no element {e}"));
                    }
                }
            }
            other => panic!("unmodelled command {other:?}"),
        }
        Ok(())
    }

    /// Every rule, as JSON text (for "is this object still referenced").
    fn rules_text(&self) -> String {
        Value::from(
            self.chains
                .values()
                .flatten()
                .map(|r| Value::from(r.clone()))
                .collect::<Vec<_>>(),
        )
        .to_string()
    }

    fn lookup(&self, set: &str, key: &[u128]) -> Option<&Option<Value>> {
        let s = self
            .sets
            .get(set.trim_start_matches('@'))
            .unwrap_or_else(|| panic!("no set {set}"));
        s.elems.iter().find_map(|(k, d)| {
            (k.len() == key.len() && k.iter().zip(key).all(|((lo, hi), x)| lo <= x && x <= hi))
                .then_some(d)
        })
    }

    /// Decides `p` from the `forward` chain; counts in `self.counters`.
    pub fn run(&mut self, p: &Packet) -> bool {
        self.run_marked(p).0
    }

    /// [`run`](Self::run), and the counters it moved.
    pub fn run_counted(&mut self, p: &Packet) -> (bool, Vec<String>) {
        let before = self.counters.clone();
        let pass = self.run(p);
        let moved = self
            .counters
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect();
        (pass, moved)
    }

    /// [`run`](Self::run), and the conntrack mark the packet left.
    pub fn run_marked(&mut self, p: &Packet) -> (bool, u128) {
        let mut mark: u128 = 0;
        let mut stack: Vec<(String, usize)> = Vec::new();
        let (mut chain, mut at) = ("forward".to_string(), 0usize);
        loop {
            let rules = &self.chains[&chain];
            let Some(rule) = rules.get(at).cloned() else {
                match stack.pop() {
                    Some((c, i)) => (chain, at) = (c, i),
                    None => return (self.policies["forward"], mark),
                }
                continue;
            };
            at += 1;
            match self.rule(&rule, p, &mut mark) {
                None => {}
                Some(v) => match v {
                    Verdict::Accept => return (true, mark),
                    Verdict::Drop => return (false, mark),
                    Verdict::Return => match stack.pop() {
                        Some((c, i)) => (chain, at) = (c, i),
                        None => return (self.policies["forward"], mark),
                    },
                    Verdict::Jump(t) => {
                        stack.push((chain, at));
                        (chain, at) = (t, 0);
                    }
                    Verdict::Goto(t) => (chain, at) = (t, 0),
                },
            }
        }
    }

    /// Runs one rule: `None` when it ends without a verdict.
    fn rule(&mut self, exprs: &[Value], p: &Packet, mark: &mut u128) -> Option<Verdict> {
        for e in exprs {
            let (kind, body) = e.as_object().unwrap().iter().next().unwrap();
            match kind.as_str() {
                "match" => {
                    let left = value(&body["left"], p, *mark)?;
                    let right = &body["right"];
                    let hit = match right {
                        Value::String(s) if s.starts_with('@') => self.lookup(s, &left).is_some(),
                        Value::Object(o) if o.contains_key("set") => {
                            let items = o["set"].as_array().expect("an anonymous set's items");
                            items.iter().any(|x| left == [num(x)])
                        }
                        // `ct state`/`ct status`: the model's packets are new flows' first
                        // packets, tracked and not yet confirmed.
                        _ if body["left"].get("ct").is_some_and(|c| c["key"] == "state") => {
                            ct_has(right, "new")
                        }
                        // A first packet's entry is neither confirmed nor stamped.
                        _ if body["left"]
                            .get("ct")
                            .is_some_and(|c| c["key"] == "status" || c["key"] == "label") =>
                        {
                            false
                        }
                        r => panic!("unmodelled match {r}"),
                    };
                    // `!=`: the lookup inverted (a miss matches).
                    if hit == (body["op"] == "!=") {
                        return None;
                    }
                }
                "vmap" => {
                    let k = value(&body["key"], p, *mark)?;
                    let data = self.lookup(body["data"].as_str().unwrap(), &k)?.clone()?;
                    return Some(verdict(&data));
                }
                // The stamp of an allowed flow: nothing a first packet's verdict reads.
                "mangle" if body["key"]["ct"]["key"] == "label" => {}
                "mangle" => {
                    assert_eq!(body["key"]["ct"]["key"], "mark", "{e}");
                    let v = &body["value"];
                    *mark = match v.get("map") {
                        Some(m) => {
                            let k = value(&m["key"], p, *mark)?;
                            let d = self.lookup(m["data"].as_str().unwrap(), &k)?.clone()?;
                            num(&d)
                        }
                        None => num(v),
                    };
                }
                "counter" => *self.counters.get_mut(body.as_str().unwrap()).unwrap() += 1,
                _ => return Some(verdict(e)),
            }
        }
        None
    }
}

/// Whether a `ct` match's right side (one name or a list) names `what`.
fn ct_has(right: &Value, what: &str) -> bool {
    match right {
        Value::String(s) => s == what,
        Value::Array(v) => v.iter().any(|x| x == what),
        other => panic!("unmodelled ct value {other}"),
    }
}

enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

fn verdict(v: &Value) -> Verdict {
    let (kind, body) = v.as_object().unwrap().iter().next().unwrap();
    let target = || body["target"].as_str().unwrap().to_string();
    match kind.as_str() {
        "accept" => Verdict::Accept,
        "drop" => Verdict::Drop,
        "return" => Verdict::Return,
        "jump" => Verdict::Jump(target()),
        "goto" => Verdict::Goto(target()),
        _ => panic!("unmodelled statement {v}"),
    }
}

/// An expression's value on `p`: one component per concatenated field; `None` where nft's
/// implicit protocol dependency fails (an `ip` field of an IPv6 packet).
fn value(e: &Value, p: &Packet, mark: u128) -> Option<Vec<u128>> {
    if let Some(parts) = e.get("concat") {
        let mut out = Vec::new();
        for x in parts.as_array().unwrap() {
            out.extend(value(x, p, mark)?);
        }
        return Some(out);
    }
    let addr = |a: IpAddr| match a {
        IpAddr::V4(x) => u128::from(u32::from(x)),
        IpAddr::V6(x) => u128::from(x),
    };
    let v = if let Some(m) = e.get("meta") {
        match m["key"].as_str().unwrap() {
            "iif" => u128::from(p.iif),
            "oif" => u128::from(p.oif),
            "l4proto" => u128::from(p.proto),
            k => panic!("meta {k}"),
        }
    } else if let Some(pl) = e.get("payload") {
        let v4 = p.src.is_ipv4();
        match (
            pl["protocol"].as_str().unwrap(),
            pl["field"].as_str().unwrap(),
        ) {
            ("ip", _) if !v4 => return None,
            ("ip6", _) if v4 => return None,
            ("ip" | "ip6", "saddr") => addr(p.src),
            ("ip" | "ip6", "daddr") => addr(p.dst),
            // Raw transport header bytes: meaningful for ported protocols, and every set
            // keyed by it is keyed by the protocol too.
            ("th", "dport") => u128::from(p.port),
            other => panic!("payload {other:?}"),
        }
    } else if e.get("ct").is_some_and(|c| c["key"] == "mark") {
        mark
    } else if e
        .get("ct")
        .is_some_and(|c| ["state", "status", "label"].contains(&c["key"].as_str().unwrap_or("")))
    {
        0
    } else {
        panic!("unmodelled expression {e}")
    };
    Some(vec![v])
}
