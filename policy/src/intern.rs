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

use crate::table::Table;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sym(u32);

#[derive(Default)]
pub struct Interner(Table<Arc<str>>);

impl Interner {
    /// Returns the symbol for `s`, taking one reference on it.
    pub fn intern(&mut self, s: &str) -> Sym {
        match self.0.retain_existing(s) {
            Some(id) => Sym(id),
            None => Sym(self.0.insert_new(Arc::from(s))),
        }
    }

    /// Looks a string up without taking a reference.
    pub fn get(&self, s: &str) -> Option<Sym> {
        self.0.find(s).map(Sym)
    }

    pub fn retain(&mut self, sym: Sym) {
        self.0.retain(sym.0);
    }

    pub fn release(&mut self, sym: Sym) {
        self.0.release(sym.0);
    }

    pub fn resolve(&self, sym: Sym) -> &str {
        self.0.get(sym.0)
    }

    /// Number of live strings (for leak tests and memory reports).
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
