# Writes Moat's own ClusterNetworkPolicy cases: what the upstream ones (shared/conformance/cnp)
# leave out — NetworkPolicy beside CNP in one cluster, `networks` and `ipBlock` placeholders on
# a `cluster:` section, overrides on top of it, and CNP on the x/y/z model. Each expectation is
# stated by hand from the API's semantics (not computed by Moat): a function
# (probe, from, to) -> allowed. Run from this directory: python3 generate.py
import yaml

class Flow(dict): pass
yaml.add_representer(Flow, lambda d, m: d.represent_mapping('tag:yaml.org,2002:map', m.items(), flow_style=True))
yaml.Dumper.ignore_aliases = lambda *a: True
# One-letter names quoted, as the schema asks: a YAML 1.1 parser reads a bare y as true.
def quoted(d, s):
    style = '"' if s in ("x", "y", "z", "a", "b", "c") or (len(s) == 3 and s[1] == "/") else None
    return d.represent_scalar('tag:yaml.org,2002:str', s, style=style)
yaml.add_representer(str, quoted)

def label(n): return {"kubernetes.io/metadata.name": n}

# The cluster of the cluster: cases. `idle` has no pods; "http" names a different port on
# different pods, and db/replica has no container ports at all.
CLUSTER = {
    "namespaces": {
        "app": {**label("app"), "env": "prod"},
        "db": {**label("db"), "env": "prod"},
        "dev": {**label("dev"), "env": "dev"},
        "idle": {**label("idle"), "env": "dev"},
    },
    "pods": {
        "app/web-0": {"labels": {"role": "web"}, "ports": [Flow(name="http", port=80, protocol="TCP")]},
        "app/web-1": {"labels": {"role": "web", "canary": "true"}, "ports": [Flow(name="http", port=8080, protocol="TCP")]},
        "db/main": {"labels": {"role": "db"}, "ports": [Flow(name="http", port=80, protocol="TCP"), Flow(name="dns", port=53, protocol="UDP")]},
        "db/replica": {"labels": {"role": "replica"}},
        "dev/tool": {"labels": {"role": "tool"}, "ports": [Flow(name="dns", port=53, protocol="UDP")]},
    },
    "serves": [Flow(protocol="TCP", port=80), Flow(protocol="TCP", port=8080), Flow(protocol="UDP", port=53)],
}
W0, W1, M, R, T = "app/web-0", "app/web-1", "db/main", "db/replica", "dev/tool"
APP, DB = (W0, W1), (M, R)
TCP80, TCP8080, UDP53 = ("TCP", 80), ("TCP", 8080), ("UDP", 53)

XYZ = [f"{n}/{p}" for n in "xyz" for p in "abc"]

def case(name, source, policies, allowed, pods=tuple(CLUSTER["pods"]), probes=CLUSTER["serves"], **extra):
    expect = []
    for pr in probes:
        key = (pr["protocol"], pr["port"])
        # Self cells too (as shared/conformance does): the runner lists but never counts them.
        exc = [Flow({"from": f, "to": t, "allowed": False}) for f in pods for t in pods
               if not allowed(key, f, t)]
        expect.append({"probe": Flow(pr), "default": True, "exceptions": exc})
    doc = {"name": name, "source": source}
    if pods is not XYZ:
        doc["cluster"] = CLUSTER
    doc["policies"] = policies
    doc.update(extra)
    doc["probes"] = [Flow(p) for p in probes]
    doc["expect"] = expect
    with open(f"{name}.yaml", "w") as f:
        f.write(yaml.dump(doc, sort_keys=False, default_flow_style=False, width=120))

def np(ns, name, spec):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec}

def cnp(name, tier, priority, subject, ingress=None, egress=None):
    spec = {"tier": tier, "priority": priority, "subject": subject}
    if ingress is not None: spec["ingress"] = ingress
    if egress is not None: spec["egress"] = egress
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "metadata": {"name": name}, "spec": spec}

def rule(action, peers, key, protocols=None):
    r = {"action": action, key: peers}
    if protocols is not None: r["protocols"] = protocols
    return r
ing = lambda action, peers, protocols=None: rule(action, peers, "from", protocols)
egr = lambda action, peers, protocols=None: rule(action, peers, "to", protocols)
ns_sel = lambda **l: {"namespaces": {"matchLabels": l}}
name_sel = lambda n: {"namespaces": {"matchLabels": label(n)}}
pods_sel = lambda ns, pod: {"pods": {"namespaceSelector": ns, "podSelector": pod}}
port = lambda proto, n: {proto: {"destinationPort": {"number": n}}}

# Admin Deny and Accept override a NetworkPolicy; Admin Pass hands over to it; an Admin egress
# Accept leaves the destination's ingress to its own policies.
def admin_over_np(pr, f, t):
    if f == T and t in APP:
        return pr == TCP80                       # admin-egress: Accept TCP 80, Deny the rest
    if t in DB:
        if f == W1 and pr == TCP80:
            return False                         # admin-db: Deny from the canary on TCP 80
        if f == T:
            return pr == UDP53                   # Accept UDP 53; else Pass, and db/from-app denies
        return f in APP                          # db/from-app (db/main -> db/replica too)
    return True
case("moat-cnp-admin-over-networkpolicy",
     "Moat: Admin Deny/Accept override a NetworkPolicy, Pass defers to it, egress Accept leaves ingress alone",
     [np("db", "from-app", {"podSelector": {}, "policyTypes": ["Ingress"],
                            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": label("app")}}]}]}),
      cnp("admin-db", "Admin", 10, {"pods": {"namespaceSelector": {"matchLabels": label("db")}, "podSelector": {}}},
          ingress=[ing("Deny", [pods_sel({"matchLabels": label("app")}, {"matchLabels": {"canary": "true"}})], [port("tcp", 80)]),
                   ing("Accept", [ns_sel(env="dev")], [port("udp", 53)]),
                   ing("Pass", [ns_sel(env="dev")])]),
      cnp("admin-egress", "Admin", 20, name_sel("dev"),
          egress=[egr("Accept", [ns_sel(env="prod")], [port("tcp", 80)]),
                  egr("Deny", [name_sel("app")])])],
     admin_over_np)

# A NetworkPolicy decides for the pods and directions it isolates; everything else meets the
# Baseline tier: web-1 is isolated for egress only, db/main for ingress only.
def baseline_under_np(pr, f, t):
    if f == W1:
        egress = t in APP + DB                   # app/egress-web-1: prod namespaces only
    else:
        egress = not (t == M and pr == TCP80)    # baseline: Deny to db's named port http
    if t == M:
        ingress = f in APP and pr == TCP80       # db/main-from-web: web pods, port http (80 here)
    else:
        ingress = f != T or pr == UDP53          # baseline: Pass tool's UDP 53, Deny dev
    return egress and ingress
case("moat-cnp-baseline-under-networkpolicy",
     "Moat: the Baseline tier judges only what no NetworkPolicy isolates, per pod and direction",
     [np("app", "egress-web-1", {"podSelector": {"matchLabels": {"canary": "true"}}, "policyTypes": ["Egress"],
                                  "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}]}]}),
      np("db", "main-from-web", {"podSelector": {"matchLabels": {"role": "db"}}, "policyTypes": ["Ingress"],
                                 "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "web"}}}],
                                              "ports": [{"port": "http"}]}]}),
      cnp("baseline", "Baseline", 10, {"namespaces": {}},
          ingress=[ing("Pass", [pods_sel({}, {"matchLabels": {"role": "tool"}})], [port("udp", 53)]),
                   ing("Deny", [ns_sel(env="dev")])],
          egress=[egr("Deny", [name_sel("db")], [{"destinationNamedPort": "http"}])])],
     baseline_under_np)

# Placeholders in CNP `networks` and NetworkPolicy `ipBlock` on a cluster: section, either family.
def networks(pr, f, t):
    if f in APP:
        if t == R:
            return False                         # Deny to db/replica's /32 (/128), first
        if pr == TCP8080:
            return False                         # Deny TCP 8080 to the pods' /4
    if t == T and f == W1:
        return False                             # dev/tool's ipBlock excepts web-1, whatever egress said
    return True
case("moat-cnp-networks-placeholders",
     "Moat: CNP egress networks and NetworkPolicy ipBlock from pod-address placeholders",
     [cnp("app-networks", "Admin", 1, {"pods": {"namespaceSelector": {"matchLabels": label("app")}, "podSelector": {}}},
          egress=[egr("Deny", [{"networks": ["{{podCIDR db/replica}}"]}]),
                  egr("Accept", [{"networks": ["{{podLargeCIDR db/main}}"]}], [port("udp", 53)]),
                  egr("Deny", [{"networks": ["{{podLargeCIDR app/web-0}}"]}], [port("tcp", 8080)])]),
      np("dev", "tool-from-block", {"podSelector": {}, "policyTypes": ["Ingress"],
                                    "ingress": [{"from": [{"ipBlock": {"cidr": "{{podLargeCIDR app/web-0}}",
                                                                       "except": ["{{podCIDR app/web-1}}"]}}]}]})],
     networks)

# Subjects and peers follow label changes live; each step holds the earlier changes.
relabel = [cnp("web-from-dev", "Admin", 5,
               {"pods": {"namespaceSelector": {"matchLabels": {"env": "prod"}}, "podSelector": {"matchLabels": {"role": "web"}}}},
               ingress=[ing("Deny", [ns_sel(env="dev")])])]
api = {W1: {"role": "api", "canary": "true"}}
db_dev = {"db": {**label("db"), "env": "dev"}}
case("moat-cnp-relabel-step1", "Moat: CNP subject and peers follow labels -- step 1 of 3", relabel,
     lambda pr, f, t: not (f == T and t in APP))
case("moat-cnp-relabel-step2", "Moat: CNP subject and peers follow labels -- step 2 of 3 (web-1 leaves the subject)",
     relabel, lambda pr, f, t: not (f == T and t == W0), podLabels=api)
case("moat-cnp-relabel-step3", "Moat: CNP subject and peers follow labels -- step 3 of 3 (db becomes a dev namespace)",
     relabel, lambda pr, f, t: not (f in (T, M, R) and t == W0), namespaceLabels=db_dev, podLabels=api)

# CNP on the x/y/z model: named port, port range and Pass into a NetworkPolicy.
def xyz(pr, f, t):
    if t != "x/a":
        return True
    if f.startswith("y/"):
        return pr == ("TCP", 80)                 # Deny serve-81-udp; Pass, and x/from-y allows TCP 80
    if f.startswith("z/"):
        return pr == ("TCP", 81)                 # Accept TCP 81-90; the rest meets x/from-y
    return False                                 # x/from-y isolates x/a
case("moat-cnp-xyz-model",
     "Moat: ClusterNetworkPolicy on the x/y/z model (named port, range, Pass into a NetworkPolicy)",
     [np("x", "from-y", {"podSelector": {"matchLabels": {"pod": "a"}},
                         "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": 80}]}]}),
      cnp("x-a", "Admin", 100, {"pods": {"namespaceSelector": {"matchLabels": {"ns": "x"}}, "podSelector": {"matchLabels": {"pod": "a"}}}},
          ingress=[ing("Deny", [ns_sel(ns="y")], [{"destinationNamedPort": "serve-81-udp"}]),
                   ing("Accept", [ns_sel(ns="z")], [{"tcp": {"destinationPort": {"range": {"start": 81, "end": 90}}}}]),
                   ing("Pass", [ns_sel(ns="y")])])],
     xyz, pods=XYZ, probes=[Flow(protocol="TCP", port=80), Flow(protocol="TCP", port=81), Flow(protocol="UDP", port=81)])
