//! Local pods on real netlink, in a private network namespace: the enforcer's topology
//! watcher sees veth "pods", their host routes, a route moving, a bridged veth and an uplink;
//! the real `moat-test-enforcer` binds pod addresses, keeps the bindings across a restart
//! (an address that moved while it was down stays unknown), hands topology changes to its
//! backend as `set_local` within milliseconds, and reports degradations.

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moat_dataplane::local::{Interfaces, PodInterfaces, Topology};
use moat_enforcer::host::Watcher;
use moat_integration::bed::{self, Bed, WAIT, wait_until};
use moat_integration::netns;
use serde_json::Value;

fn ip(args: &str) {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ifindex(name: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .expect("ifindex")
        .trim()
        .parse()
        .unwrap()
}

/// A veth pair, both ends up (the peer stays in this namespace: a pod-like interface
/// without routes).
fn veth(name: &str) {
    ip(&format!("link add {name} type veth peer name {name}p"));
    ip(&format!("link set {name}p up"));
    ip(&format!("link set {name} up"));
}

fn a(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Waits until the watcher publishes a topology satisfying `f`; how long it took.
fn until(w: &Watcher, what: &str, f: impl Fn(&Topology, &Interfaces) -> bool) -> Duration {
    let rx = w.subscribe();
    let t = Instant::now();
    loop {
        {
            let topo = rx.borrow();
            if f(&topo, &Interfaces::classify(&topo, &PodInterfaces::Auto)) {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{what}: the watcher still says {topo:#?}"
            );
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn watcher_follows_pods_routes_bridges_and_uplinks() {
    if !netns::inside("watcher_follows_pods_routes_bridges_and_uplinks") {
        return;
    }
    // Present before the watcher starts: found by the first dump.
    veth("up0");
    ip("addr add 192.168.77.1/24 dev up0");
    veth("vpa");
    ip("addr add 169.254.1.1/32 dev vpa");
    ip("route add 10.9.0.5/32 dev vpa");
    ip("-6 route add fd09::5/128 dev vpa");
    let w = Watcher::start().expect("watcher");
    let (up0, vpa) = (ifindex("up0"), ifindex("vpa"));
    let t = w.subscribe().borrow().clone();
    let i = Interfaces::classify(&t, &PodInterfaces::Auto);
    assert_eq!(
        i.pods.get(&vpa),
        Some(&[a("10.9.0.5"), a("fd09::5")].into())
    );
    assert!(
        i.other.contains(&up0),
        "an uplink veth with a global address is not a pod"
    );
    assert_eq!(t.links[&vpa].kind, "veth");

    // After it started: followed by events. A new pod's interface is classified before any
    // route exists.
    veth("vpb");
    let vpb = ifindex("vpb");
    until(&w, "a new veth", |_, i| i.pods.contains_key(&vpb));
    // The address moves to the new pod's interface (delete, add) …
    ip("route del 10.9.0.5/32 dev vpa");
    ip("route add 10.9.0.5/32 dev vpb");
    let took = until(&w, "an IPv4 route moved", |t, _| {
        t.routes.get(&a("10.9.0.5")) == Some(&vpb)
    });
    eprintln!(
        "route move seen {} µs after `ip route add` returned",
        took.as_micros()
    );
    // … or is replaced in place.
    ip("-6 route replace fd09::5/128 dev vpb");
    until(&w, "an IPv6 route replaced", |t, _| {
        t.routes.get(&a("fd09::5")) == Some(&vpb)
    });
    // A gateway route with a lower metric wins: nobody's pod address any more.
    ip("route del 10.9.0.5/32 dev vpb");
    ip("route add 10.9.0.5/32 dev vpb metric 10");
    ip("route add 10.9.0.5/32 via 192.168.77.2 metric 5");
    until(&w, "a gateway winning", |t, _| {
        !t.routes.contains_key(&a("10.9.0.5"))
    });
    ip("route del 10.9.0.5/32 via 192.168.77.2 metric 5");
    until(&w, "the gateway route gone", |t, _| {
        t.routes.get(&a("10.9.0.5")) == Some(&vpb)
    });

    // A bridge CNI: the veth enslaved to a bridge is reported, not a pod; released, it is.
    ip("link add br9 type bridge");
    ip("link set br9 up");
    veth("vpc");
    let vpc = ifindex("vpc");
    ip("link set vpc master br9");
    until(&w, "a bridged veth", |_, i| {
        i.bridged == vec!["vpc".to_string()] && !i.pods.contains_key(&vpc)
    });
    ip("link set vpc nomaster");
    until(&w, "the veth released", |_, i| {
        i.bridged.is_empty() && i.pods.contains_key(&vpc)
    });

    // An uplink that gets its global address later stops being a pod.
    veth("up1");
    let up1 = ifindex("up1");
    until(&w, "up1 first looks like a pod", |_, i| {
        i.pods.contains_key(&up1)
    });
    ip("-6 addr add 2001:db8:77::1/64 dev up1 nodad");
    until(&w, "up1 holds a global address", |_, i| {
        i.other.contains(&up1)
    });

    // A deleted pod takes its routes along (IPv4 says nothing about them).
    ip("link del vpb");
    until(&w, "the pod and its routes gone", |t, _| {
        !t.links.contains_key(&vpb) && t.routes.is_empty()
    });
    // An interface going down loses its IPv4 routes silently: the watcher dumps again.
    ip("route add 10.9.0.6/32 dev vpa");
    until(&w, "a route on vpa", |t, _| {
        t.routes.contains_key(&a("10.9.0.6"))
    });
    ip("link set vpa down");
    until(&w, "vpa's routes gone with it", |t, _| {
        !t.routes.contains_key(&a("10.9.0.6"))
    });
}

/// The local table the recording backend was last given (an event with `local`), by
/// (interface, address) → "known:<endpoint>" or "unknown".
fn last_local(bed: &Bed, node: &str) -> Option<(String, Table)> {
    let ev = bed
        .all_events(node)
        .into_iter()
        .rev()
        .find(|e| e.get("local").is_some())?;
    Some((ev["op"].as_str()?.to_string(), table(&ev["local"])))
}

/// (interface, address, state) rows of a recorded local table.
type Table = Vec<(u32, String, String)>;

fn table(local: &Value) -> Table {
    local["addrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            let state = match x["state"].as_str().unwrap() {
                "known" => format!("known:{}", x["endpoint"].as_str().unwrap()),
                s => s.to_string(),
            };
            (
                x["iface"].as_u64().unwrap() as u32,
                x["addr"].as_str().unwrap().to_string(),
                state,
            )
        })
        .collect()
}

fn has(t: &[(u32, String, String)], iface: u32, addr: &str, state: &str) -> bool {
    t.iter()
        .any(|(i, a, s)| *i == iface && a == addr && s == state)
}

/// The endpoint the applied snapshot names for `addr`.
fn endpoint_of(bed: &Bed, node: &str, addr: &str) -> String {
    let raw = std::fs::read(bed.path(&format!("rec/{node}/applied.json"))).expect("applied");
    let snap: Value = serde_json::from_slice(&raw).unwrap();
    snap["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["addrs"].as_array().unwrap().iter().any(|x| x == addr))
        .map(|e| e["id"].as_str().unwrap().to_string())
        .expect("an endpoint for the address")
}

fn metric(bed: &Bed, node: &str, name: &str) -> f64 {
    bed::metric(&bed::scrape(bed.enforcers[node].metrics), name)
}

#[test]
fn enforcer_binds_pods_across_restarts_and_reports_degradation() {
    if !netns::inside("enforcer_binds_pods_across_restarts_and_reports_degradation") {
        return;
    }
    ip("link set lo up");
    // The bed's node n1 runs web-n1 (10.50.0.1) and db-n1 (10.50.0.2).
    veth("vpa");
    veth("vpb");
    ip("route add 10.50.0.1/32 dev vpa");
    ip("route add 10.50.0.2/32 dev vpb");
    let (vpa, vpb) = (ifindex("vpa"), ifindex("vpb"));
    let mut bed = Bed::new(&["n1"]);
    bed.start_server();
    bed.start_enforcer("n1");
    bed.wait_in_sync(&["n1"]);
    let (web, db) = (
        format!("known:{}", endpoint_of(&bed, "n1", "10.50.0.1")),
        format!("known:{}", endpoint_of(&bed, "n1", "10.50.0.2")),
    );
    let (op, t) = last_local(&bed, "n1").expect("a local table");
    assert_eq!(op, "full", "the first version carries the local table");
    assert!(
        has(&t, vpa, "10.50.0.1", &web) && has(&t, vpb, "10.50.0.2", &db),
        "{t:?}"
    );

    // A pod the snapshot doesn't name: its interface and route reach the backend as
    // set_local, unknown.
    let before = now_micros();
    veth("vpc");
    ip("route add 10.50.0.99/32 dev vpc");
    let after = now_micros();
    let vpc = ifindex("vpc");
    let mut seen = None;
    wait_until("the new pod in set_local", WAIT, || {
        seen = bed.all_events("n1").into_iter().find(|e| {
            e["op"] == "set_local" && has(&table(&e["local"]), vpc, "10.50.0.99", "unknown")
        });
        seen.is_some()
    });
    // Signed: the backend may hear of the route before `ip` has even exited.
    let ts = seen.unwrap()["ts"].as_u64().unwrap() as i64;
    let late = ts - after as i64;
    eprintln!(
        "topology change → set_local: {late} µs after `ip route add` returned ({} µs after the veth was created)",
        ts - before as i64
    );
    assert!(late < 1_000_000, "set_local came {late} µs late");
    wait_until("metrics count the unknown address", WAIT, || {
        metric(&bed, "n1", "moat_enforcer_pod_addresses_unknown") == 1.0
            && metric(&bed, "n1", "moat_enforcer_pod_addresses_known") == 2.0
    });

    // While the enforcer is down, web's address moves to a new interface (a new pod on a
    // reused address). After the restart it stays unknown: the snapshot still names the old
    // pod, whose rules the new one must never get.
    bed.kill_enforcer("n1");
    ip("route del 10.50.0.1/32 dev vpa");
    veth("vpd");
    ip("route add 10.50.0.1/32 dev vpd");
    let vpd = ifindex("vpd");
    let events_before = bed.all_events("n1").len();
    bed.start_enforcer("n1");
    wait_until("adopted", WAIT, || {
        bed.all_events("n1")[events_before..]
            .iter()
            .any(|e| e["op"] == "adopt")
    });
    let adopt = bed.all_events("n1")[events_before..]
        .iter()
        .find(|e| e["op"] == "adopt")
        .cloned()
        .unwrap();
    let t = table(&adopt["local"]);
    assert!(
        has(&t, vpd, "10.50.0.1", "unknown"),
        "moved while down: {t:?}"
    );
    assert!(has(&t, vpb, "10.50.0.2", &db), "{t:?}");
    assert!(has(&t, vpc, "10.50.0.99", "unknown"), "{t:?}");
    bed.wait_in_sync(&["n1"]);
    let (_, t) = last_local(&bed, "n1").unwrap();
    assert!(
        has(&t, vpd, "10.50.0.1", "unknown"),
        "still unknown once in sync: {t:?}"
    );
    // Back on the interface it was bound to, it is web's again.
    ip("route del 10.50.0.1/32 dev vpd");
    ip("route add 10.50.0.1/32 dev vpa");
    wait_until("web's address back on its own interface", WAIT, || {
        last_local(&bed, "n1")
            .is_some_and(|(op, t)| op == "set_local" && has(&t, vpa, "10.50.0.1", &web))
    });

    // The dataplane can't hold db's rule list: the version is applied, acknowledged with the
    // degradation, and the node says so; a version that fits clears it.
    let raw = std::fs::read(bed.path("rec/n1/applied.json")).unwrap();
    let snap: Value = serde_json::from_slice(&raw).unwrap();
    let db_ep = db.trim_start_matches("known:");
    let rule = snap["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == db_ep)
        .and_then(|e| e["ingress"]["rules"][0].as_str())
        .expect("db's ingress rule")
        .to_string();
    std::fs::write(
        bed.path("rec/n1/degrade"),
        format!("{rule} needs more than the 10 table elements the dataplane can hold\n"),
    )
    .unwrap();
    bed.write_policy("web", "80");
    bed.wait_in_sync(&["n1"]);
    let last = bed
        .all_events("n1")
        .into_iter()
        .rev()
        .find(|e| e.get("degraded").is_some())
        .unwrap();
    assert_eq!(
        last["degraded"][0]["rules"][0],
        Value::from(rule.clone()),
        "{last}"
    );
    assert_eq!(
        last["degraded"][0]["endpoints"][0],
        Value::from(db_ep),
        "{last}"
    );
    wait_until("the degraded metric", WAIT, || {
        metric(&bed, "n1", "moat_enforcer_degraded") == 1.0
    });
    assert_eq!(
        bed::health_status(
            bed.enforcers["n1"].health,
            moat_enforcer::agent::SYNC_SERVICE
        ),
        bed::SERVING,
        "a degraded version is applied"
    );
    let log = bed.enforcer_stderr("n1");
    assert!(
        log.contains("degraded") && log.contains("10 table elements"),
        "{log}"
    );
    std::fs::remove_file(bed.path("rec/n1/degrade")).unwrap();
    bed.write_policy("web", "81");
    bed.wait_in_sync(&["n1"]);
    wait_until("no longer degraded", WAIT, || {
        metric(&bed, "n1", "moat_enforcer_degraded") == 0.0
    });
}
