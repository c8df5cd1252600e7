//! A reference-counted intern table: equal keys share one small integer ID, and a key is
//! dropped (its ID reused) when its last reference goes. The string, label-set and selector
//! interners are all this, with their own key types.

use std::borrow::Borrow;
use std::hash::Hash;

use rustc_hash::FxHashMap;

pub struct Table<K> {
    ids: FxHashMap<K, u32>,
    slots: Vec<Slot<K>>,
    free: Vec<u32>,
}

struct Slot<K> {
    key: Option<K>,
    refs: u32,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Self {
            ids: FxHashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<K: Hash + Eq + Clone> Table<K> {
    /// The ID of an existing key, taking a reference.
    pub fn retain_existing<Q>(&mut self, key: &Q) -> Option<u32>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let id = *self.ids.get(key)?;
        self.slots[id as usize].refs += 1;
        Some(id)
    }

    /// The ID of `key` without taking a reference.
    pub fn find<Q>(&self, key: &Q) -> Option<u32>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.ids.get(key).copied()
    }

    /// Adds a key that is not in the table, with one reference.
    pub fn insert_new(&mut self, key: K) -> u32 {
        debug_assert!(!self.ids.contains_key(&key));
        let slot = Slot {
            key: Some(key.clone()),
            refs: 1,
        };
        let id = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                u32::try_from(self.slots.len() - 1).expect("more than 2^32 interned keys")
            }
        };
        self.ids.insert(key, id);
        id
    }

    pub fn retain(&mut self, id: u32) {
        self.slots[id as usize].refs += 1;
    }

    /// Drops one reference; returns the key if that was the last one (so the caller can
    /// release what the key itself holds).
    pub fn release(&mut self, id: u32) -> Option<K> {
        let slot = &mut self.slots[id as usize];
        debug_assert!(slot.refs > 0, "released a dead entry");
        slot.refs -= 1;
        if slot.refs > 0 {
            return None;
        }
        let key = slot.key.take().expect("live slot has a key");
        self.ids.remove(&key);
        self.free.push(id);
        Some(key)
    }

    pub fn get(&self, id: u32) -> &K {
        self.slots[id as usize]
            .key
            .as_ref()
            .expect("looked up a dead entry")
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}
