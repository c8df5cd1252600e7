//! Interned label selectors, matched against interned label sets.
//!
//! Identical selectors (same requirements, whatever the order they were written in) share one
//! [`SelId`], which is what lets identical peers in different policies share one address group.

use rustc_hash::FxHashMap;

use crate::faults::{self, Fault};
use crate::intern::{Interner, Sym};
use crate::ir::digest::Enc;
use crate::labels::{Labels, value_of};
use crate::model::{self, Op};

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

struct Slot {
    reqs: Box<[Req]>,
    content: [u8; 32],
    refs: u32,
}

#[derive(Default)]
pub struct Selectors {
    ids: FxHashMap<Box<[Req]>, SelId>,
    slots: Vec<Slot>,
    free: Vec<u32>,
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
        // Order by symbols for the map key; the model already removed duplicates.
        reqs.sort_unstable();
        let reqs = reqs.into_boxed_slice();
        if let Some(&id) = self.ids.get(&reqs) {
            for s in reqs.iter().flat_map(Req::syms) {
                strings.release(s);
            }
            self.slots[id.0 as usize].refs += 1;
            return id;
        }
        let slot = Slot {
            reqs: reqs.clone(),
            content: content_hash(sel),
            refs: 1,
        };
        let id = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                SelId(i)
            }
            None => {
                self.slots.push(slot);
                SelId(u32::try_from(self.slots.len() - 1).expect("too many selectors"))
            }
        };
        self.ids.insert(reqs, id);
        id
    }

    pub fn retain(&mut self, id: SelId) {
        self.slots[id.0 as usize].refs += 1;
    }

    pub fn release(&mut self, strings: &mut Interner, id: SelId) {
        let slot = &mut self.slots[id.0 as usize];
        debug_assert!(slot.refs > 0);
        slot.refs -= 1;
        if slot.refs == 0 {
            let reqs = std::mem::take(&mut slot.reqs);
            self.ids.remove(&reqs);
            for s in reqs.iter().flat_map(Req::syms) {
                strings.release(s);
            }
            self.free.push(id.0);
        }
    }

    pub fn matches(&self, id: SelId, labels: &Labels) -> bool {
        self.slots[id.0 as usize]
            .reqs
            .iter()
            .all(|r| r.matches(labels))
    }

    pub fn content(&self, id: SelId) -> &[u8; 32] {
        &self.slots[id.0 as usize].content
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}
