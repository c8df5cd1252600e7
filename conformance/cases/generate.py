# Writes Moat's own conformance cases. Each expectation below is stated by hand from the
# Kubernetes semantics (not computed by Moat): a function (from, to) -> allowed per probe.
import yaml, itertools
PODS = [f"{n}/{p}" for n in "xyz" for p in "abc"]

class Q(str): pass
def q_repr(d, s): return d.represent_scalar('tag:yaml.org,2002:str', s, style='"')
yaml.add_representer(Q, q_repr)
class Flow(dict): pass
yaml.add_representer(Flow, lambda d, m: d.represent_mapping('tag:yaml.org,2002:map', m.items(), flow_style=True))
yaml.Dumper.ignore_aliases = lambda *a: True

def quote(o):
    if isinstance(o, dict): return {quote(k) if k in ("x","y","z") or "/" in k and len(k)==3 else k: quote(v) for k, v in o.items()}
    if isinstance(o, list): return [quote(v) for v in o]
    if isinstance(o, str) and o in ("x","y","z","a","b","c"): return Q(o)
    return o

def case(name, source, policies, probes, allowed, **extra):
    expect = []
    for pr in probes:
        exc = [Flow({"from": Q(f), "to": Q(t), "allowed": False}) for f in PODS for t in PODS if not allowed(pr, f, t)]
        expect.append({"probe": Flow(pr), "default": True, "exceptions": exc})
    doc = {"name": name, "source": source, "policies": quote(policies)}
    doc.update({k: quote(v) for k, v in extra.items()})
    doc["probes"] = [Flow(p) for p in probes]
    doc["expect"] = expect
    with open(f"{name}.yaml", "w") as f:
        f.write(yaml.dump(doc, sort_keys=False, default_flow_style=False, width=120))

def np(ns, name, spec):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec}

P = lambda proto, port: {"protocol": proto, "port": port}

# endPort is inclusive; a range of one protocol does not open another.
case("moat-endport-range", "Moat: endPort makes an inclusive range (79-80 admits 80, not 81)",
     [np("x", "range", {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                         "ingress": [{"ports": [{"protocol": "TCP", "port": 79, "endPort": 80}]}]})],
     [P("TCP", 80), P("TCP", 81), P("UDP", 80)],
     lambda pr, f, t: not (t == "x/a" and (pr["port"] == 81 or pr["protocol"] == "UDP")))

# Named ports resolve per destination pod, by name and protocol, for ingress and egress.
ports = {"x/a": [{"name": "web", "port": 80, "protocol": "TCP"}],
         "x/b": [{"name": "web", "port": 81, "protocol": "TCP"}],
         "x/c": [{"name": "web", "port": 80, "protocol": "UDP"}]}
web = {"x/a": ("TCP", 80), "x/b": ("TCP", 81)}  # x/c's "web" is UDP: a TCP "web" doesn't match it
def named(pr, f, t):
    key = (pr["protocol"], pr["port"])
    if t.startswith("x/") and web.get(t) != key:
        return False                     # x pods admit only their own TCP "web" port
    if f == "y/a":                       # y/a may only reach x pods on their TCP "web" port
        return t.startswith("x/") and web.get(t) == key
    return True
case("moat-named-ports-differ-per-pod", "Moat: one port name, different ports per pod (ingress and egress)",
     [np("x", "web-in", {"podSelector": {}, "ingress": [{"ports": [{"port": "web"}]}]}),
      np("y", "web-out", {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                          "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}], "ports": [{"port": "web"}]}]})],
     [P("TCP", 80), P("TCP", 81), P("UDP", 80)], named, podPorts=ports)

# 0.0.0.0/0 with an except (IPv4 only: an IPv4 /0 does not match IPv6 addresses).
case("moat-ipblock-everything-except-ipv4", "Moat: ipBlock 0.0.0.0/0 with except",
     [np("x", "all-but-yb", {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                              "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["{{podCIDR y/b}}"]}}]}]})],
     [P("TCP", 80), P("UDP", 81)],
     lambda pr, f, t: not (f == "x/a" and t == "y/b"))

case("moat-ipblock-two-excepts", "Moat: ipBlock with two excepts, either family",
     [np("x", "large-but-two", {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                                 "egress": [{"to": [{"ipBlock": {"cidr": "{{podLargeCIDR x/a}}", "except": ["{{podCIDR y/b}}", "{{podCIDR z/c}}"]}}]}]})],
     [P("TCP", 80)],
     lambda pr, f, t: not (f == "x/a" and t in ("y/b", "z/c")))

# NotIn is true when the key is absent.
case("moat-notin-absent-key", "Moat: NotIn matches pods without the key",
     [np("x", "not-prod", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {},
          "podSelector": {"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod"]}]}}]}]})],
     [P("TCP", 80)],
     lambda pr, f, t: not (f == "y/b" and t.startswith("x/")),
     podLabels={"y/b": {"pod": "b", "env": "prod"}, "z/c": {"pod": "c", "env": "dev"}})

# Exists / DoesNotExist on pods and namespaces.
def exists(pr, f, t):
    if t == "x/b" and f in ("x/b", "y/c"):
        return False
    if t == "y/a" and f.startswith("z/"):
        return False
    return True
case("moat-exists-doesnotexist", "Moat: Exists and DoesNotExist on pod and namespace labels",
     [np("x", "team-pods", {"podSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]},
                            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}}]}]}),
      np("y", "unrestricted", {"podSelector": {"matchLabels": {"pod": "a"}},
                               "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "restricted", "operator": "DoesNotExist"}]}}]}]})],
     [P("TCP", 80)], exists,
     namespaceLabels={"z": {"ns": "z", "kubernetes.io/metadata.name": "z", "restricted": "true"}},
     podLabels={"x/b": {"pod": "b", "team": "blue"}, "y/c": {"pod": "c", "team": "red"}})

# policyTypes omitted: Ingress always; Egress only with a non-empty egress list.
def no_types(pr, f, t):
    if t in ("z/c", "y/b"):
        return False                       # both isolated for ingress with no ingress rules
    if f == "z/c":
        return t == "z/a"                  # z/c's egress: only to z/a
    return True
case("moat-egress-without-policy-types", "Moat: egress-only policies without policyTypes",
     [np("z", "egress-to-a", {"podSelector": {"matchLabels": {"pod": "c"}}, "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
      np("y", "empty-egress", {"podSelector": {"matchLabels": {"pod": "b"}}, "egress": []})],
     [P("TCP", 80), P("UDP", 81)], no_types)

# SCTP through a named port.
case("moat-sctp-named-port", "Moat: an SCTP named port opens only that SCTP port",
     [np("x", "sctp-81", {"podSelector": {"matchLabels": {"pod": "c"}},
                          "ingress": [{"ports": [{"port": "serve-81-sctp", "protocol": "SCTP"}]}]})],
     [P("SCTP", 81), P("SCTP", 80), P("TCP", 81)],
     lambda pr, f, t: not (t == "x/c" and (pr["protocol"], pr["port"]) != ("SCTP", 81)))

# Namespace labels change under a live policy.
base = lambda n: {"ns": n, "kubernetes.io/metadata.name": n}
pol = [np("x", "from-blue", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]})]
case("moat-namespace-relabel-step1", "Moat: namespace relabelled under a live policy -- step 1 of 2", pol, [P("TCP", 80)],
     lambda pr, f, t: not (t.startswith("x/") and not f.startswith("y/")),
     namespaceLabels={"y": {**base("y"), "team": "blue"}})
case("moat-namespace-relabel-step2", "Moat: namespace relabelled under a live policy -- step 2 of 2", pol, [P("TCP", 80)],
     lambda pr, f, t: not (t.startswith("x/") and not f.startswith("z/")),
     namespaceLabels={"z": {**base("z"), "team": "blue"}})

# ipBlock peers match pod addresses; peers are ORed.
case("moat-ipblock-or-podselector", "Moat: an ipBlock matching a pod, ORed with a podSelector",
     [np("y", "two-ways", {"podSelector": {"matchLabels": {"pod": "c"}},
                           "ingress": [{"from": [{"ipBlock": {"cidr": "{{podCIDR x/a}}"}}, {"podSelector": {"matchLabels": {"pod": "b"}}}]}]})],
     [P("TCP", 80)],
     lambda pr, f, t: not (t == "y/c" and f not in ("x/a", "y/b")))
