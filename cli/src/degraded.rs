//! How `moatctl status` shows what nodes deny instead of enforcing exactly (fail closed),
//! their local pod tables, and what a policy costs.

use moat_proto::v1;
use serde_json::{Value, json};

/// A node-supplied string made safe for a terminal: control characters (escape sequences,
/// newlines that would forge lines) are shown escaped.
pub fn esc(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let e: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            e
        })
        .collect()
}

fn direction(egress: bool) -> &'static str {
    if egress { "egress" } else { "ingress" }
}

fn rule_ref(p: &v1::PolicyRule) -> String {
    format!(
        "{}/{} spec.{}[{}]",
        p.namespace,
        p.name,
        direction(p.egress),
        p.rule
    )
}

pub fn degradation_json(d: &v1::NodeDegradation) -> Value {
    json!({
        "direction": direction(d.egress),
        "by": d.by,
        "reason": d.reason,
        "policies": d.policies.iter().map(|p| json!({
            "namespace": p.namespace, "name": p.name, "direction": direction(p.egress), "rule": p.rule,
        })).collect::<Vec<_>>(),
        "pods": d.pods,
        "rules": d.rules,
        "unmapped_rules": d.unmapped_rules,
        "endpoints": d.endpoints,
        "unmapped_endpoints": d.unmapped_endpoints,
    })
}

/// The `degraded` and `local` fields of a node in `-o json`.
pub fn node_json(n: &v1::NodeStatus) -> (Value, Value) {
    let degraded = n.degraded.iter().map(degradation_json).collect::<Vec<_>>();
    let local = n.local.as_ref().map_or(Value::Null, |l| {
        json!({
            "known": l.known, "unknown": l.unknown, "unknown_pods": l.unknown_pods,
            "unsupported": l.unsupported,
        })
    });
    (Value::from(degraded), local)
}

/// `", N degraded"` for summary lines, if any node is.
pub fn summary(nodes: &[&v1::NodeStatus]) -> String {
    match nodes.iter().filter(|n| !n.degraded.is_empty()).count() {
        0 => String::new(),
        n => format!(", {n} degraded"),
    }
}

/// The IN SYNC cell: a node enforcing its newest version with some lists denied is not
/// simply "yes".
pub fn in_sync_cell(n: &v1::NodeStatus) -> &'static str {
    match (n.in_sync, n.degraded.is_empty()) {
        (false, _) => "NO",
        (true, true) => "yes",
        (true, false) => "DEGRADED",
    }
}

fn print_degradation(indent: &str, d: &v1::NodeDegradation) {
    let by = if d.by == "server" {
        "cut by the server"
    } else {
        "the node's dataplane"
    };
    println!(
        "{indent}{} denied ({by}): {}",
        direction(d.egress),
        esc(&d.reason)
    );
    let mut policies: Vec<String> = d.policies.iter().map(rule_ref).collect();
    if d.unmapped_rules > 0 {
        policies.push(format!(
            "{} of its {} rules no longer in the server's state",
            d.unmapped_rules, d.rules
        ));
    }
    println!("{indent}  policies: {}", or_dash(&policies.join(", ")));
    let mut pods = d.pods.clone();
    if d.unmapped_endpoints > 0 {
        pods.push(format!("{} pods since gone", d.unmapped_endpoints));
    }
    println!("{indent}  pods: {}", or_dash(&pods.join(", ")));
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

/// After the node table: every degraded node's denied lists, and local pod tables worth
/// an operator's attention (unknown pods, weakened source validation).
pub fn print_nodes(nodes: &[&v1::NodeStatus]) {
    let degraded: Vec<_> = nodes.iter().filter(|n| !n.degraded.is_empty()).collect();
    if !degraded.is_empty() {
        println!("degraded (rule lists denied instead of enforced; every other pod is exact):");
        for n in degraded {
            println!("  {}:", n.node);
            for d in &n.degraded {
                print_degradation("    ", d);
            }
        }
    }
    let local: Vec<_> = nodes
        .iter()
        .filter_map(|n| Some((n, n.local.as_ref()?)))
        .filter(|(_, l)| l.unknown > 0 || !l.unsupported.is_empty())
        .collect();
    if !local.is_empty() {
        println!("local pods:");
        for (n, l) in local {
            let mut parts = vec![format!(
                "{} known, {} unknown ({})",
                l.known,
                l.unknown,
                match l.unknown_pods.as_str() {
                    "allow" => "allowed: --unknown-pods allow".to_string(),
                    "deny" | "" => "denied".to_string(),
                    other => format!("--unknown-pods {}", esc(other)),
                }
            )];
            if !l.unsupported.is_empty() {
                parts.push(format!(
                    "source validation unsupported: {}",
                    esc(&l.unsupported)
                ));
            }
            println!("  {}: {}", n.node, parts.join("; "));
        }
    }
}

/// `moatctl status --policy`: where the policy is degraded and what it costs.
pub fn print_policy(r: &v1::PolicyStatusResponse) {
    let degraded: Vec<_> = r.nodes.iter().filter(|n| !n.degraded.is_empty()).collect();
    if !degraded.is_empty() {
        println!(
            "  degraded on {} of {} nodes (its rules there are denied instead of enforced):",
            degraded.len(),
            r.nodes.len()
        );
        for n in degraded {
            println!("  {}:", n.node);
            for d in &n.degraded {
                print_degradation("    ", d);
            }
        }
    }
    if let Some(b) = busiest(r) {
        let warn = if b.estimated_elements > r.cost_warn && r.cost_warn > 0 {
            format!(" — above the server's --policy-cost-warn {}", r.cost_warn)
        } else {
            String::new()
        };
        println!(
            "  estimated cost: {} dataplane elements on {} (its busiest node){warn}",
            b.estimated_elements, b.node
        );
    }
}

fn busiest(r: &v1::PolicyStatusResponse) -> Option<&v1::PolicyNode> {
    r.nodes
        .iter()
        .fold(None, |best: Option<&v1::PolicyNode>, n| match best {
            Some(b) if b.estimated_elements >= n.estimated_elements => best,
            _ => Some(n),
        })
}

/// The fields `--policy -o json` adds: per node and for the policy.
pub fn policy_node_json(n: &v1::PolicyNode) -> (Value, Value) {
    (
        Value::from(n.degraded.iter().map(degradation_json).collect::<Vec<_>>()),
        Value::from(n.estimated_elements),
    )
}

pub fn policy_json(r: &v1::PolicyStatusResponse) -> Value {
    let b = busiest(r);
    json!({
        "degraded_nodes": r.nodes.iter().filter(|n| !n.degraded.is_empty()).count(),
        "busiest_node": b.map(|b| b.node.clone()),
        "estimated_elements": b.map_or(0, |b| b.estimated_elements),
        "cost_warn": r.cost_warn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(esc("map full\n\u{1b}[2Jok"), "map full\\n\\u{1b}[2Jok");
        assert_eq!(esc("élément"), "élément");
    }
}
