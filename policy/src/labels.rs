//! Interned label sets.
//!
//! Replicas of one workload carry the same labels, so pods are grouped by label set: a
//! selector is evaluated once per distinct set, not once per pod.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use crate::intern::{Interner, Sym};

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

#[derive(Default)]
pub struct LabelSets {
    ids: FxHashMap<Box<Labels>, LabelSetId>,
    slots: Vec<Slot>,
    free: Vec<u32>,
}

struct Slot {
    labels: Box<Labels>,
    refs: u32,
}

impl LabelSets {
    /// Interns a label map, taking one reference on the set.
    pub fn intern(
        &mut self,
        strings: &mut Interner,
        labels: &BTreeMap<String, String>,
    ) -> LabelSetId {
        // Fast path: every string is already known and so is the set.
        let mut probe: Vec<(Sym, Sym)> = Vec::with_capacity(labels.len());
        let mut known = true;
        for (k, v) in labels {
            match (strings.get(k), strings.get(v)) {
                (Some(k), Some(v)) => probe.push((k, v)),
                _ => {
                    known = false;
                    break;
                }
            }
        }
        if known {
            probe.sort_unstable();
            if let Some(&id) = self.ids.get(probe.as_slice()) {
                self.slots[id.0 as usize].refs += 1;
                return id;
            }
        }
        let mut set: Vec<(Sym, Sym)> = labels
            .iter()
            .map(|(k, v)| (strings.intern(k), strings.intern(v)))
            .collect();
        set.sort_unstable();
        if let Some(&id) = self.ids.get(set.as_slice()) {
            for (k, v) in set {
                strings.release(k);
                strings.release(v);
            }
            self.slots[id.0 as usize].refs += 1;
            return id;
        }
        let labels: Box<Labels> = set.into_boxed_slice();
        let slot = Slot {
            labels: labels.clone(),
            refs: 1,
        };
        let id = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                LabelSetId(i)
            }
            None => {
                self.slots.push(slot);
                LabelSetId(u32::try_from(self.slots.len() - 1).expect("too many label sets"))
            }
        };
        self.ids.insert(labels, id);
        id
    }

    pub fn release(&mut self, strings: &mut Interner, id: LabelSetId) {
        let slot = &mut self.slots[id.0 as usize];
        debug_assert!(slot.refs > 0);
        slot.refs -= 1;
        if slot.refs == 0 {
            let labels = std::mem::take(&mut slot.labels);
            self.ids.remove(&labels);
            for &(k, v) in labels.iter() {
                strings.release(k);
                strings.release(v);
            }
            self.free.push(id.0);
        }
    }

    pub fn get(&self, id: LabelSetId) -> &Labels {
        &self.slots[id.0 as usize].labels
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
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
