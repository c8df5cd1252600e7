//! Reference-counted string interning.
//!
//! Label keys and values repeat across thousands of pods, so the index stores them once and
//! compares them as integers. Counts matter: label values such as `pod-template-hash` or a
//! Job's controller UID churn forever in a live cluster, and an interner that never forgets
//! would grow without bound in a long-running server.
//!
//! A [`Sym`] number depends on arrival order, so it must never reach a digest or an ID: those
//! hash the strings themselves.

use std::sync::Arc;

use rustc_hash::FxHashMap;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sym(u32);

#[derive(Default)]
pub struct Interner {
    ids: FxHashMap<Arc<str>, Sym>,
    slots: Vec<Slot>,
    free: Vec<u32>,
}

struct Slot {
    text: Option<Arc<str>>,
    refs: u32,
}

impl Interner {
    /// Returns the symbol for `s`, taking one reference on it.
    pub fn intern(&mut self, s: &str) -> Sym {
        if let Some(&sym) = self.ids.get(s) {
            self.slots[sym.0 as usize].refs += 1;
            return sym;
        }
        let text: Arc<str> = Arc::from(s);
        let slot = Slot {
            text: Some(text.clone()),
            refs: 1,
        };
        let sym = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                Sym(i)
            }
            None => {
                self.slots.push(slot);
                Sym(u32::try_from(self.slots.len() - 1).expect("more than 2^32 strings"))
            }
        };
        self.ids.insert(text, sym);
        sym
    }

    /// Looks a string up without taking a reference.
    pub fn get(&self, s: &str) -> Option<Sym> {
        self.ids.get(s).copied()
    }

    pub fn retain(&mut self, sym: Sym) {
        self.slots[sym.0 as usize].refs += 1;
    }

    pub fn release(&mut self, sym: Sym) {
        let slot = &mut self.slots[sym.0 as usize];
        debug_assert!(slot.refs > 0, "released a dead symbol");
        slot.refs -= 1;
        if slot.refs == 0 {
            let text = slot.text.take().expect("live slot has text");
            self.ids.remove(&*text);
            self.free.push(sym.0);
        }
    }

    pub fn resolve(&self, sym: Sym) -> &str {
        self.slots[sym.0 as usize]
            .text
            .as_deref()
            .expect("resolved a dead symbol")
    }

    /// Number of live strings (for leak tests and memory reports).
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

    #[test]
    fn counts_and_reuses_slots() {
        let mut i = Interner::default();
        let a = i.intern("app");
        let a2 = i.intern("app");
        assert_eq!(a, a2);
        let b = i.intern("web");
        assert_eq!(i.resolve(b), "web");
        i.release(a);
        assert_eq!(i.get("app"), Some(a));
        i.release(a2);
        assert_eq!(i.get("app"), None);
        let c = i.intern("db");
        assert_eq!(c, a, "freed slot is reused");
        assert_eq!(i.len(), 2);
    }
}
