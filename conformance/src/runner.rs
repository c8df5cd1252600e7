//! Runs cases against backends and compares every probe with the expected truth table.

use std::fmt;
use std::net::IpAddr;

use moat_policy::model::K8sObject;

use crate::Error;
use crate::case::{Case, ProbeSpec};
use crate::cluster::{self, Family, Plan};
use crate::layout::Layout;

/// One probe: `from` connects to `to`'s address with `spec`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub from_ip: IpAddr,
    pub to_ip: IpAddr,
    pub spec: ProbeSpec,
}

/// Something that enforces policy on the conformance cluster: the model, or a dataplane.
pub trait Backend {
    /// Makes the cluster hold exactly `objects`, as live updates from what it held before,
    /// and returns once the new state is enforced.
    fn apply(&mut self, objects: &[K8sObject]) -> Result<(), Error>;
    /// Whether each probe's connection succeeds.
    fn probe(&mut self, probes: &[Probe]) -> Result<Vec<bool>, Error>;
    /// Whether it can hold any namespaces and pods a case's `cluster:` section lists, not
    /// just the x/y/z pods (see [`enter`](Self::enter)); by default a backend cannot.
    fn supports_cluster_section(&self) -> bool {
        false
    }
    /// Called before every case's [`apply`](Self::apply) with the namespaces and pods it needs
    /// (the x/y/z model too), so a backend that supports `cluster:` sections can hold them: a
    /// packet cluster switches to the netns cluster of these pods and ports. Labels and
    /// container ports arrive with `apply`, as objects.
    fn enter(&mut self, _layout: &Layout) -> Result<(), Error> {
        Ok(())
    }
}

/// What the runner reports for a `cluster:` case on a backend that cannot hold it: a failure
/// of the case, never a silent skip, and no sign that the cluster itself broke.
pub const CLUSTER_SECTION_UNSUPPORTED: &str =
    "cluster: cases are not supported by this backend (it holds only the x/y/z pods)";

fn refuses(case: &Case, backend: &dyn Backend) -> bool {
    case.cluster.is_some() && !backend.supports_cluster_section()
}

/// Builds a backend for a cluster with this addressing.
pub type Factory<'a> = Box<dyn FnMut(Plan) -> Result<Box<dyn Backend>, Error> + 'a>;

pub struct Options {
    pub families: Vec<Family>,
    /// Address slot of the clusters (see `Plan::id`); packet backends take a free one.
    pub plan_id: u8,
    /// A fresh cluster for every case file.
    pub scratch: bool,
    /// One cluster for the whole run, every case applied as a live update to the last.
    pub live: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub spec: ProbeSpec,
    pub expected: bool,
    pub got: bool,
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = |b: bool| if b { "allowed" } else { "denied" };
        write!(
            f,
            "{} -> {} {}/{}: expected {}, got {}",
            self.from,
            self.to,
            self.spec.protocol,
            self.spec.port,
            word(self.expected),
            word(self.got)
        )
    }
}

#[derive(Clone, Debug)]
pub enum Outcome {
    /// Every non-loopback cell matched. Loopback cells that differ are listed, not counted.
    Pass {
        loopback: Vec<Cell>,
    },
    Fail {
        wrong: Vec<Cell>,
        loopback: Vec<Cell>,
    },
    Skipped(String),
    Error(String),
}

#[derive(Clone, Debug)]
pub struct Run {
    /// e.g. `compiled ipv6 live`.
    pub label: String,
    pub outcome: Outcome,
}

#[derive(Clone, Debug)]
pub struct CaseReport {
    pub name: String,
    pub runs: Vec<Run>,
}

impl CaseReport {
    pub fn passed(&self) -> bool {
        self.runs
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Pass { .. } | Outcome::Skipped(_)))
    }
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub cases: Vec<CaseReport>,
}

impl Report {
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.passed()).count()
    }

    pub fn failed(&self) -> usize {
        self.cases.len() - self.passed()
    }

    fn case(&mut self, name: &str) -> &mut CaseReport {
        if let Some(i) = self.cases.iter().position(|c| c.name == name) {
            return &mut self.cases[i];
        }
        self.cases.push(CaseReport {
            name: name.to_string(),
            runs: Vec::new(),
        });
        self.cases.last_mut().expect("pushed")
    }
}

impl fmt::Display for CaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let loopback: usize = self
            .runs
            .iter()
            .map(|r| match &r.outcome {
                Outcome::Pass { loopback } | Outcome::Fail { loopback, .. } => loopback.len(),
                _ => 0,
            })
            .sum();
        let skipped: Vec<&str> = self
            .runs
            .iter()
            .filter_map(|r| match &r.outcome {
                Outcome::Skipped(why) => Some(why.as_str()),
                _ => None,
            })
            .collect();
        let ran = self.runs.len() - skipped.len();
        write!(
            f,
            "{} {} ({ran} runs",
            if self.passed() { "PASS" } else { "FAIL" },
            self.name
        )?;
        if let Some(why) = skipped.first() {
            write!(f, "; {} skipped: {why}", skipped.len())?;
        }
        if loopback > 0 {
            write!(f, "; {loopback} loopback cells differ, not counted")?;
        }
        write!(f, ")")?;
        for r in &self.runs {
            match &r.outcome {
                Outcome::Fail { wrong, .. } => {
                    write!(f, "\n    {}: {} cells wrong", r.label, wrong.len())?;
                    for c in wrong.iter().take(12) {
                        write!(f, "\n      {c}")?;
                    }
                    if wrong.len() > 12 {
                        write!(f, "\n      …")?;
                    }
                }
                Outcome::Error(e) => write!(f, "\n    {}: error: {e}", r.label)?,
                _ => {}
            }
        }
        Ok(())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.cases {
            writeln!(f, "{c}")?;
        }
        write!(f, "{} passed, {} failed", self.passed(), self.failed())
    }
}

/// Every ordered pod pair × every probe of the case.
///
/// # Panics
/// If the case's pods are inconsistent (an override naming a pod the case lacks); every case
/// [`Case::parse`] returned is consistent.
pub fn probes(case: &Case, plan: Plan) -> Vec<Probe> {
    let layout = Layout::of(case).unwrap_or_else(|e| panic!("{e}"));
    probes_in(&layout, case, plan)
}

/// [`probes`] for a case whose layout is already known.
pub fn probes_in(layout: &Layout, case: &Case, plan: Plan) -> Vec<Probe> {
    let mut out = Vec::new();
    for spec in &case.probes {
        for from in &layout.pods {
            for to in &layout.pods {
                out.push(Probe {
                    from: from.key.clone(),
                    to: to.key.clone(),
                    from_ip: from.ip(plan),
                    to_ip: to.ip(plan),
                    spec: *spec,
                });
            }
        }
    }
    out
}

fn check(case: &Case, backend: &mut dyn Backend, plan: Plan) -> Outcome {
    if refuses(case, backend) {
        return Outcome::Error(CLUSTER_SECTION_UNSUPPORTED.into());
    }
    let layout = match Layout::of(case) {
        Ok(l) => l,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    let objects = match cluster::objects_in(&layout, case, plan) {
        Ok(o) => o,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    if let Err(e) = backend.enter(&layout) {
        return Outcome::Error(e.to_string());
    }
    if let Err(e) = backend.apply(&objects) {
        return Outcome::Error(e.to_string());
    }
    let probes = probes_in(&layout, case, plan);
    let got = match backend.probe(&probes) {
        Ok(g) => g,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    let mut wrong = Vec::new();
    let mut loopback = Vec::new();
    for (p, got) in probes.iter().zip(got) {
        let exp = case
            .expect
            .iter()
            .find(|e| e.probe == p.spec)
            .expect("validated: one expectation per probe");
        let expected = exp.allowed(&p.from, &p.to);
        if expected != got {
            let cell = Cell {
                from: p.from.clone(),
                to: p.to.clone(),
                spec: p.spec,
                expected,
                got,
            };
            if p.from == p.to {
                loopback.push(cell);
            } else {
                wrong.push(cell);
            }
        }
    }
    if wrong.is_empty() {
        Outcome::Pass { loopback }
    } else {
        Outcome::Fail { wrong, loopback }
    }
}

/// Runs every case on every named backend, per family, from scratch and/or live.
pub fn run(cases: &[Case], backends: &mut [(String, Factory<'_>)], opts: &Options) -> Report {
    let mut report = Report::default();
    for (name, factory) in backends.iter_mut() {
        for &family in &opts.families {
            let plan = Plan {
                family,
                id: opts.plan_id,
            };
            let skip = |case: &Case| {
                (family == Family::Ipv6 && case.ipv4_only())
                    .then(|| "-ipv4 case, IPv6 run skipped".to_string())
            };
            if opts.scratch {
                for case in cases {
                    let label = format!("{name} {family} scratch");
                    let outcome = match skip(case) {
                        Some(why) => Outcome::Skipped(why),
                        None => match factory(plan) {
                            Ok(mut b) => check(case, b.as_mut(), plan),
                            Err(e) => Outcome::Error(e.to_string()),
                        },
                    };
                    report.case(&case.name).runs.push(Run { label, outcome });
                }
            }
            if opts.live {
                let mut backend = factory(plan);
                // A broken cluster would make every later case wait out its timeouts: after
                // an error the cluster is rebuilt once, and a second error in a row ends the run.
                let mut errors_in_a_row = 0;
                for case in cases {
                    let label = format!("{name} {family} live");
                    // Not a fault of the cluster: it neither counts towards a rebuild nor
                    // hides the cases after it.
                    let refused = matches!(&backend, Ok(b) if refuses(case, b.as_ref()));
                    let outcome = match (skip(case), &mut backend) {
                        (Some(why), _) => Outcome::Skipped(why),
                        _ if refused => Outcome::Error(CLUSTER_SECTION_UNSUPPORTED.into()),
                        _ if errors_in_a_row >= 2 => {
                            Outcome::Error("not run: the cluster failed twice in a row".into())
                        }
                        (None, Ok(b)) => check(case, b.as_mut(), plan),
                        (None, Err(e)) => Outcome::Error(e.to_string()),
                    };
                    match &outcome {
                        // The cluster was never touched: nothing to learn about its health.
                        _ if refused => {}
                        Outcome::Error(_) => {
                            errors_in_a_row += 1;
                            if errors_in_a_row == 1 {
                                // The old cluster must be gone before its replacement takes its names.
                                drop(std::mem::replace(
                                    &mut backend,
                                    Err(Error::Backend("rebuilding".into())),
                                ));
                                backend = factory(plan);
                            }
                        }
                        Outcome::Skipped(_) => {}
                        Outcome::Pass { .. } | Outcome::Fail { .. } => errors_in_a_row = 0,
                    }
                    report.case(&case.name).runs.push(Run { label, outcome });
                }
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use std::cell::Cell as Counter;

    use super::*;

    /// Fails every apply; counts how often it was built.
    struct Broken;

    impl Backend for Broken {
        fn apply(&mut self, _: &[K8sObject]) -> Result<(), Error> {
            Err(Error::Backend("apply timed out".into()))
        }
        fn probe(&mut self, probes: &[Probe]) -> Result<Vec<bool>, Error> {
            Ok(vec![true; probes.len()])
        }
    }

    /// The evaluator behind a backend that, like a packet cluster, holds only x/y/z pods.
    #[derive(Default)]
    struct XyzOnly(crate::model::Evaluator);

    impl Backend for XyzOnly {
        fn apply(&mut self, objects: &[K8sObject]) -> Result<(), Error> {
            self.0.apply(objects)
        }
        fn probe(&mut self, probes: &[Probe]) -> Result<Vec<bool>, Error> {
            self.0.probe(probes)
        }
    }

    /// `cluster:` cases fail by name on such a backend, every one of them, and the live
    /// cluster is neither rebuilt nor abandoned: the x/y/z cases after them still run.
    #[test]
    fn cluster_cases_fail_on_a_backend_without_them_and_the_run_goes_on() {
        let built = Counter::new(0);
        let factory: Factory<'_> = Box::new(|_| {
            built.set(built.get() + 1);
            Ok(Box::new(XyzOnly::default()) as Box<dyn Backend>)
        });
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("upstream/cnp");
        let mut all: Vec<Case> = crate::load_dir(&dir).unwrap().into_iter().take(3).collect();
        all.extend(cases(2));
        let opts = Options {
            families: vec![Family::Ipv4],
            plan_id: 0,
            scratch: true,
            live: true,
        };
        let report = run(&all, &mut [("packets".into(), factory)], &opts);
        assert_eq!((report.failed(), report.passed()), (3, 2), "{report}");
        for c in &report.cases[..3] {
            for r in &c.runs {
                assert!(
                    matches!(&r.outcome, Outcome::Error(m) if m == CLUSTER_SECTION_UNSUPPORTED),
                    "{}: {:?}",
                    c.name,
                    r.outcome
                );
            }
        }
        assert_eq!(
            built.get(),
            5 + 1,
            "one per scratch case, one live cluster never rebuilt"
        );
    }

    /// The evaluator, holding any layout, logging what the runner asks of it.
    struct Logged(
        crate::model::Evaluator,
        std::rc::Rc<std::cell::RefCell<Vec<String>>>,
    );

    impl Backend for Logged {
        fn supports_cluster_section(&self) -> bool {
            true
        }
        fn enter(&mut self, layout: &Layout) -> Result<(), Error> {
            let first = &layout.pods[0].key;
            self.1.borrow_mut().push(format!("enter {first}"));
            Ok(())
        }
        fn apply(&mut self, objects: &[K8sObject]) -> Result<(), Error> {
            self.1.borrow_mut().push("apply".into());
            self.0.apply(objects)
        }
        fn probe(&mut self, probes: &[Probe]) -> Result<Vec<bool>, Error> {
            self.0.probe(probes)
        }
    }

    /// A backend learns each case's pods before its objects, x/y/z cases included, so it can
    /// move to the cluster that holds them.
    #[test]
    fn every_case_enters_its_layout_before_it_is_applied() {
        let log = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let backend_log = log.clone();
        let factory: Factory<'_> = Box::new(move |_| {
            Ok(Box::new(Logged(Default::default(), backend_log.clone())) as Box<dyn Backend>)
        });
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("upstream/cnp");
        let mut all: Vec<Case> = crate::load_dir(&dir).unwrap().into_iter().take(1).collect();
        all.extend(cases(1));
        let opts = Options {
            families: vec![Family::Ipv4],
            plan_id: 0,
            scratch: false,
            live: true,
        };
        let report = run(&all, &mut [("logged".into(), factory)], &opts);
        assert_eq!(report.passed(), 2, "{report}");
        let fixture = Layout::of(&all[0]).unwrap().pods[0].key.clone();
        assert_eq!(
            *log.borrow(),
            [
                format!("enter {fixture}"),
                "apply".into(),
                "enter x/a".into(),
                "apply".into()
            ]
        );
    }

    fn cases(n: usize) -> Vec<Case> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("upstream/netpol");
        crate::load_dir(&dir).unwrap().into_iter().take(n).collect()
    }

    #[test]
    fn a_broken_live_cluster_is_rebuilt_once_then_the_run_stops() {
        let built = Counter::new(0);
        let factory: Factory<'_> = Box::new(|_| {
            built.set(built.get() + 1);
            Ok(Box::new(Broken) as Box<dyn Backend>)
        });
        let opts = Options {
            families: vec![Family::Ipv4],
            plan_id: 0,
            scratch: false,
            live: true,
        };
        let report = run(&cases(5), &mut [("broken".into(), factory)], &opts);
        assert_eq!(report.failed(), 5);
        assert_eq!(built.get(), 2, "built, then rebuilt once");
        let last = &report.cases[4].runs[0].outcome;
        assert!(
            matches!(last, Outcome::Error(m) if m.contains("not run")),
            "{last:?}"
        );
    }
}
