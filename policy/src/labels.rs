//! Interned label sets.
//!
//! Replicas of one workload carry the same labels, so pods are grouped by label set: a
//! selector is evaluated once per distinct set, not once per pod.

use std::collections::BTreeMap;

use crate::intern::{Interner, Sym};
use crate::table::Table;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelSetId(u32);

/// Labels as `(key, value)` symbol pairs sorted by key symbol; keys are unique.
pub type Labels = [(Sym, Sym)];

pub fn value_of(labels: &Labels, key: Sym) -> Option<Sym> {
    labels
        .binary_search_by(|(k, _)| k.cmp(&key))
        .ok()
        .map(|i| labels[i].1)
}

/// Label sets, each holding one reference on each of its strings.
#[derive(Default)]
pub struct LabelSets(Table<Box<Labels>>);

impl LabelSets {
    /// Interns a label map, taking one reference on the set.
    pub fn intern(
        &mut self,
        strings: &mut Interner,
        labels: &BTreeMap<String, String>,
    ) -> LabelSetId {
        // Fast path, no allocation of strings: every string is already known and so is the set.
        let probe: Option<Vec<(Sym, Sym)>> = labels
            .iter()
            .map(|(k, v)| Some((strings.get(k)?, strings.get(v)?)))
            .collect();
        if let Some(mut probe) = probe {
            probe.sort_unstable();
            if let Some(id) = self.0.retain_existing(probe.as_slice()) {
                return LabelSetId(id);
            }
        }
        let mut set: Vec<(Sym, Sym)> = labels
            .iter()
            .map(|(k, v)| (strings.intern(k), strings.intern(v)))
            .collect();
        set.sort_unstable();
        if let Some(id) = self.0.retain_existing(set.as_slice()) {
            // The existing set already holds these strings.
            for (k, v) in set {
                strings.release(k);
                strings.release(v);
            }
            return LabelSetId(id);
        }
        LabelSetId(self.0.insert_new(set.into_boxed_slice()))
    }

    pub fn release(&mut self, strings: &mut Interner, id: LabelSetId) {
        if let Some(labels) = self.0.release(id.0) {
            for &(k, v) in labels.iter() {
                strings.release(k);
                strings.release(v);
            }
        }
    }

    pub fn get(&self, id: LabelSetId) -> &Labels {
        self.0.get(id.0)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shares_identical_sets_and_frees_strings() {
        let mut s = Interner::default();
        let mut ls = LabelSets::default();
        let a = ls.intern(&mut s, &map(&[("app", "web"), ("tier", "fe")]));
        let b = ls.intern(&mut s, &map(&[("tier", "fe"), ("app", "web")]));
        assert_eq!(a, b);
        let app = s.get("app").unwrap();
        assert_eq!(value_of(ls.get(a), app), s.get("web"));
        ls.release(&mut s, a);
        assert_eq!(ls.len(), 1);
        ls.release(&mut s, b);
        assert_eq!(ls.len(), 0);
        assert!(s.is_empty(), "all strings released");
    }
}
