//! Server high availability: three `moat-server` replicas against the test API server, real
//! enforcers (recording backend) that fail over between them.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use moat_integration::bed::{Bed, NOT_SERVING, SERVING, WAIT, health_status, wait_until};
use moat_integration::kubeapi::{ApiServer, Kind, Options};
use moat_integration::replicas::{Replicas, SETTLE};
use moat_policy::ir::digest::Digest;

const NODES: [&str; 6] = ["n1", "n2", "n3", "n4", "n5", "n6"];

fn fleet() -> (Bed, ApiServer, Replicas) {
    let mut bed = Bed::new(&NODES);
    let api = ApiServer::start(Options::default());
    let _ = bed.kube_source(&api, "default");
    let mut reps = Replicas::new(&bed, &api, 3);
    reps.start_all();
    bed.enforcer_servers = reps.urls();
    for n in NODES {
        bed.start_enforcer(n);
    }
    applied_everywhere(&bed, &bed.expected());
    wait_until("every enforcer connected", WAIT, || {
        total(&reps) == NODES.len()
    });
    for i in 0..3 {
        wait_until("the whole fleet in every replica's status", WAIT, || {
            whole_fleet_seen(&reps, i, &[0, 1, 2])
        });
    }
    (bed, api, reps)
}

/// Whether replica `i`'s `moatctl status` shows every node connected to one of `alive`
/// and in sync: one fleet view, whichever replica holds a node's stream.
fn whole_fleet_seen(reps: &Replicas, i: usize, alive: &[usize]) -> bool {
    let names: Vec<&str> = alive.iter().map(|a| reps.all[*a].name.as_str()).collect();
    let s = reps.status(i);
    let nodes = s["nodes"].as_array().expect("nodes");
    nodes.len() == NODES.len()
        && nodes.iter().all(|n| {
            n["connected"] == true
                && n["in_sync"] == true
                && names.contains(&n["replica"].as_str().unwrap_or_default())
        })
}

fn total(reps: &Replicas) -> usize {
    (0..reps.all.len()).map(|i| reps.connected(i)).sum()
}

/// Waits until every node's backend holds `want`'s digest; how long that took.
fn applied_everywhere(bed: &Bed, want: &BTreeMap<String, Digest>) -> Duration {
    let t = Instant::now();
    wait_until("every node applied the newest content", WAIT, || {
        NODES
            .iter()
            .all(|n| bed.applied(n).map(|(_, d)| d) == want.get(*n).copied())
    });
    t.elapsed()
}

fn epoch(api: &ApiServer, replica: &str) -> u64 {
    api.get(
        Kind::ConfigMap,
        "moat-system",
        &format!("moat-replica-{replica}"),
    )
    .expect("the replica's ConfigMap")["data"]["epoch"]
        .as_str()
        .expect("epoch")
        .parse()
        .expect("a number")
}

/// Every version every enforcer acknowledged (its "applied" log lines, renames included)
/// names one content per node: checked on every ACK of the test. Returns how many.
fn versions_name_one_content(bed: &mut Bed) -> usize {
    let mut acks = 0;
    for n in NODES {
        let mut named: BTreeMap<u64, String> = BTreeMap::new();
        for line in bed
            .enforcer_stderr(n)
            .lines()
            .filter(|l| l.contains(" applied "))
        {
            let field = |k: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .unwrap_or_else(|| panic!("no {k} in {line:?}"))
                    .to_string()
            };
            let version: u64 = field("version=").parse().expect("version");
            let digest = field("digest=");
            acks += 1;
            if let Some(before) = named.insert(version, digest.clone()) {
                assert_eq!(before, digest, "{n}: version {version} named two contents");
            }
        }
    }
    assert!(acks > 0, "no acknowledgement was logged");
    acks
}

/// A pod created while the fleet fails over, in the manifests and the API server alike.
fn new_pod(bed: &Bed, api: &ApiServer, node: &str) {
    let y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: db2-{node}, namespace: app, uid: uid-db2-{node}, labels: {{app: db}}}}\nspec: {{nodeName: {node}, containers: [{{name: c, ports: [{{name: main, containerPort: 5432}}]}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.50.99.1}}]}}\n"
    );
    std::fs::write(bed.manifests().join(format!("pod-db2-{node}.yaml")), &y).unwrap();
    api.apply_yaml(&y);
}

#[test]
fn a_killed_replica_s_enforcers_re_home_and_take_the_change_made_meanwhile() {
    let (mut bed, api, mut reps) = fleet();
    let epochs: HashSet<u64> = ["r0", "r1", "r2"].iter().map(|r| epoch(&api, r)).collect();
    assert_eq!(
        epochs.len(),
        3,
        "three replicas started at once hold three epochs"
    );

    let victim = reps.busiest();
    let held = reps.connected(victim);
    assert!(held > 0);
    bed.write_policy_to(&api, "db", "5433");
    reps.kill(victim);
    new_pod(&bed, &api, "n2");
    let took = applied_everywhere(&bed, &bed.expected());
    eprintln!(
        "killed {} holding {held} of {} streams: every node applied the change in {took:?}",
        reps.all[victim].name,
        NODES.len()
    );
    wait_until("every enforcer on a surviving replica", WAIT, || {
        total(&reps) == NODES.len()
    });
    let alive: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    for &i in &alive {
        assert_eq!(health_status(reps.all[i].health, ""), SERVING);
        let t = Instant::now();
        wait_until(
            "the survivors' status showing the re-homed fleet",
            WAIT,
            || whole_fleet_seen(&reps, i, &alive),
        );
        eprintln!(
            "{}'s status shows the re-homed fleet after {:?} more",
            reps.all[i].name,
            t.elapsed()
        );
        // Every replica compiles the same content for every node: in sync by digest.
        let latest = reps.latest(i);
        for (n, d) in bed.expected() {
            assert_eq!(
                latest.get(&n).map(String::as_str),
                Some(d.to_string().as_str())
            );
        }
    }
    let acks = versions_name_one_content(&mut bed);
    eprintln!("{acks} acknowledgements, no version naming two contents");
}

#[test]
fn a_replica_partitioned_from_the_api_server_goes_stale_and_its_enforcers_move() {
    let (mut bed, api, mut reps) = fleet();
    let p = reps.busiest();
    assert!(reps.connected(p) > 0);
    reps.all[p].proxy.cut();
    wait_until("the partitioned replica unready", WAIT, || {
        health_status(reps.all[p].health, "") == NOT_SERVING
    });
    wait_until("its enforcers gone", WAIT, || reps.connected(p) == 0);
    // The change reaches every node through the replicas that still see the cluster.
    bed.write_policy_to(&api, "db", "5434");
    applied_everywhere(&bed, &bed.expected());
    wait_until("every enforcer on a current replica", WAIT, || {
        total(&reps) == NODES.len()
    });
    // Both staleness clocks run from the cut: the source's watches fail at once and its grace
    // (`--ha-stale-after`) may end before the heartbeat's next failing tick, so the streams may
    // end for either reason. The heartbeat's own verdict (what took readiness away) is always
    // logged, and every stream ended as a stale replica's.
    let ended = format!("replica {} is stale (", reps.all[p].name);
    let logged = |err: &str| {
        err.contains("no heartbeat reached the API server: this replica is stale")
            && err.contains(&ended)
    };
    let deadline = Instant::now() + SETTLE;
    let mut err = reps.stderr(p);
    while !logged(&err) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        err = reps.stderr(p);
    }
    assert!(logged(&err), "{err}");
    // Healed, it serves again.
    reps.all[p].proxy.heal();
    wait_until("the healed replica ready", WAIT, || {
        health_status(reps.all[p].health, "") == SERVING
    });
    versions_name_one_content(&mut bed);
}

#[test]
fn a_rolling_restart_drains_each_replica_and_the_fleet_follows_every_change() {
    let (mut bed, api, mut reps) = fleet();
    for i in 0..reps.all.len() {
        let name = reps.all[i].name.clone();
        let before = epoch(&api, &name);
        let held = reps.connected(i);
        let (status, err) = reps.terminate(i);
        assert!(status.success(), "{name}: {status:?}\n{err}");
        let drained = err
            .lines()
            .filter(|l| {
                l.contains("moving the enforcer to another replica") && l.contains("is draining")
            })
            .count();
        assert_eq!(drained, held, "{name} held {held} streams:\n{err}");
        wait_until("every enforcer on the other replicas", WAIT, || {
            total(&reps) == NODES.len()
        });
        bed.write_policy_to(&api, "db", &(6000 + i).to_string());
        applied_everywhere(&bed, &bed.expected());
        reps.start(i);
        assert!(
            epoch(&api, &name) > before,
            "{name} restarted under a new epoch"
        );
    }
    wait_until("every enforcer connected", WAIT, || {
        total(&reps) == NODES.len()
    });
    versions_name_one_content(&mut bed);
}
