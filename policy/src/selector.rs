//! Interned label selectors, matched against interned label sets.
//!
//! Identical selectors (same requirements, whatever the order they were written in) share one
//! [`SelId`], which is what lets identical peers in different policies share one address group.

use crate::faults::{self, Fault};
use crate::intern::{Interner, Sym};
use crate::ir::digest::Enc;
use crate::labels::{Labels, value_of};
use crate::model::{self, Op};
use crate::table::Table;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SelId(u32);

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Req {
    In(Sym, Box<[Sym]>),
    NotIn(Sym, Box<[Sym]>),
    Exists(Sym),
    DoesNotExist(Sym),
}

impl Req {
    fn syms(&self) -> impl Iterator<Item = Sym> + '_ {
        let (k, vs): (Sym, &[Sym]) = match self {
            Req::In(k, v) | Req::NotIn(k, v) => (*k, v),
            Req::Exists(k) | Req::DoesNotExist(k) => (*k, &[]),
        };
        std::iter::once(k).chain(vs.iter().copied())
    }

    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Req::In(k, vs) => value_of(labels, *k).is_some_and(|v| contains(vs, v)),
            Req::NotIn(k, vs) => match value_of(labels, *k) {
                Some(v) => !contains(vs, v),
                None => !faults::active(Fault::NotInAbsentKey),
            },
            Req::Exists(k) => value_of(labels, *k).is_some(),
            Req::DoesNotExist(k) => value_of(labels, *k).is_none(),
        }
    }
}

fn contains(vs: &[Sym], v: Sym) -> bool {
    if vs.len() == 1 {
        vs[0] == v
    } else {
        vs.binary_search(&v).is_ok()
    }
}

/// Selectors, each holding one reference on each of its strings, with their content hashes.
#[derive(Default)]
pub struct Selectors {
    table: Table<Box<[Req]>>,
    content: Vec<[u8; 32]>,
}

/// Content hash of a selector: a function of its strings only (never of symbol numbers).
pub fn content_hash(sel: &model::Selector) -> [u8; 32] {
    let mut e = Enc::new("selector");
    e.u32(sel.reqs.len() as u32);
    for r in &sel.reqs {
        e.str(&r.key);
        e.u8(r.op as u8);
        e.u32(r.values.len() as u32);
        for v in &r.values {
            e.str(v);
        }
    }
    e.finish()
}

impl Selectors {
    pub fn intern(&mut self, strings: &mut Interner, sel: &model::Selector) -> SelId {
        let mut reqs: Vec<Req> = sel
            .reqs
            .iter()
            .map(|r| {
                let k = strings.intern(&r.key);
                let mut vs: Vec<Sym> = r.values.iter().map(|v| strings.intern(v)).collect();
                vs.sort_unstable();
                let vs = vs.into_boxed_slice();
                match r.op {
                    Op::In => Req::In(k, vs),
                    Op::NotIn => Req::NotIn(k, vs),
                    Op::Exists => Req::Exists(k),
                    Op::DoesNotExist => Req::DoesNotExist(k),
                }
            })
            .collect();
        // Order by symbols for the table key; the model already removed duplicates.
        reqs.sort_unstable();
        if let Some(id) = self.table.retain_existing(reqs.as_slice()) {
            for s in reqs.iter().flat_map(Req::syms) {
                strings.release(s);
            }
            return SelId(id);
        }
        let id = self.table.insert_new(reqs.into_boxed_slice());
        if self.content.len() <= id as usize {
            self.content.resize(id as usize + 1, [0; 32]);
        }
        self.content[id as usize] = content_hash(sel);
        SelId(id)
    }

    pub fn retain(&mut self, id: SelId) {
        self.table.retain(id.0);
    }

    pub fn release(&mut self, strings: &mut Interner, id: SelId) {
        if let Some(reqs) = self.table.release(id.0) {
            for s in reqs.iter().flat_map(Req::syms) {
                strings.release(s);
            }
        }
    }

    pub fn matches(&self, id: SelId, labels: &Labels) -> bool {
        self.table.get(id.0).iter().all(|r| r.matches(labels))
    }

    pub fn content(&self, id: SelId) -> &[u8; 32] {
        &self.content[id.0 as usize]
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}
