//! Reference-counted interning of values and of their canonical keys.
//!
//! Retained windows hold `u32` ids instead of values, so a key costs the
//! same whatever its values look like, and a value that leaves every window
//! is freed (hash primitives produce a new value per rotation forever).

use std::hash::{BuildHasher, Hash};

use ahash::RandomState;
use hashbrown::hash_map::RawEntryMut;
use hashbrown::HashMap;

use super::value::{Canon, Value, ValueRef};

pub type Id = u32;

struct RawEntry {
    value: Value,
    canon: Id,
    refs: u32,
}

struct CanonEntry {
    key: Canon,
    refs: u32,
}

pub struct Interner {
    hasher: RandomState,
    raw_map: HashMap<Value, Id, RandomState>,
    raw: Vec<Option<RawEntry>>,
    raw_free: Vec<Id>,
    canon_map: HashMap<Canon, Id, RandomState>,
    canon: Vec<Option<CanonEntry>>,
    canon_free: Vec<Id>,
}

fn hash_of<T: Hash + ?Sized>(state: &RandomState, v: &T) -> u64 {
    state.hash_one(v)
}

impl Default for Interner {
    fn default() -> Self {
        Self::new()
    }
}

impl Interner {
    pub fn new() -> Self {
        let hasher = RandomState::new();
        Interner {
            raw_map: HashMap::with_hasher(hasher.clone()),
            canon_map: HashMap::with_hasher(hasher.clone()),
            hasher,
            raw: Vec::new(),
            raw_free: Vec::new(),
            canon: Vec::new(),
            canon_free: Vec::new(),
        }
    }

    /// Intern a raw value, taking one reference.
    pub fn acquire(&mut self, v: ValueRef<'_>) -> Id {
        let hash = hash_of(&self.hasher, &v);
        match self
            .raw_map
            .raw_entry_mut()
            .from_hash(hash, |k| k.as_ref() == v)
        {
            RawEntryMut::Occupied(e) => {
                let id = *e.get();
                if let Some(entry) = self.raw[id as usize].as_mut() {
                    entry.refs += 1;
                }
                id
            }
            RawEntryMut::Vacant(e) => {
                let value = v.to_owned();
                let canon = {
                    let key = v.canon();
                    let chash = hash_of(&self.hasher, &key);
                    match self
                        .canon_map
                        .raw_entry_mut()
                        .from_hash(chash, |k| *k == key)
                    {
                        RawEntryMut::Occupied(ce) => {
                            let cid = *ce.get();
                            if let Some(c) = self.canon[cid as usize].as_mut() {
                                c.refs += 1;
                            }
                            cid
                        }
                        RawEntryMut::Vacant(ce) => {
                            let cid = match self.canon_free.pop() {
                                Some(cid) => cid,
                                None => {
                                    self.canon.push(None);
                                    (self.canon.len() - 1) as Id
                                }
                            };
                            self.canon[cid as usize] = Some(CanonEntry {
                                key: key.clone(),
                                refs: 1,
                            });
                            ce.insert_hashed_nocheck(chash, key, cid);
                            cid
                        }
                    }
                };
                let id = match self.raw_free.pop() {
                    Some(id) => id,
                    None => {
                        self.raw.push(None);
                        (self.raw.len() - 1) as Id
                    }
                };
                self.raw[id as usize] = Some(RawEntry {
                    value: value.clone(),
                    canon,
                    refs: 1,
                });
                e.insert_hashed_nocheck(hash, value, id);
                id
            }
        }
    }

    /// Take one more reference on an interned raw value.
    pub fn retain(&mut self, id: Id) {
        if let Some(e) = self.raw[id as usize].as_mut() {
            e.refs += 1;
        }
    }

    /// Drop one reference; the value is freed at zero.
    pub fn release(&mut self, id: Id) {
        let Some(entry) = self.raw[id as usize].as_mut() else {
            return;
        };
        entry.refs -= 1;
        if entry.refs > 0 {
            return;
        }
        let Some(entry) = self.raw[id as usize].take() else {
            return;
        };
        let hash = hash_of(&self.hasher, &entry.value);
        if let RawEntryMut::Occupied(e) = self
            .raw_map
            .raw_entry_mut()
            .from_hash(hash, |k| *k == entry.value)
        {
            e.remove();
        }
        self.raw_free.push(id);
        self.release_canon(entry.canon);
    }

    pub fn retain_canon(&mut self, cid: Id) {
        if let Some(c) = self.canon[cid as usize].as_mut() {
            c.refs += 1;
        }
    }

    pub fn release_canon(&mut self, cid: Id) {
        let Some(c) = self.canon[cid as usize].as_mut() else {
            return;
        };
        c.refs -= 1;
        if c.refs > 0 {
            return;
        }
        let Some(c) = self.canon[cid as usize].take() else {
            return;
        };
        let hash = hash_of(&self.hasher, &c.key);
        if let RawEntryMut::Occupied(e) = self
            .canon_map
            .raw_entry_mut()
            .from_hash(hash, |k| *k == c.key)
        {
            e.remove();
        }
        self.canon_free.push(cid);
    }

    pub fn value(&self, id: Id) -> &Value {
        match self.raw[id as usize].as_ref() {
            Some(e) => &e.value,
            None => &Value::Null,
        }
    }

    pub fn canon_of(&self, id: Id) -> Id {
        self.raw[id as usize].as_ref().map_or(Id::MAX, |e| e.canon)
    }

    pub fn canon_key(&self, cid: Id) -> Option<&Canon> {
        self.canon
            .get(cid as usize)
            .and_then(|c| c.as_ref())
            .map(|c| &c.key)
    }

    /// Live interned raw values.
    pub fn len(&self) -> usize {
        self.raw_map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.raw_map.is_empty()
    }

    pub fn canon_len(&self) -> usize {
        self.canon_map.len()
    }

    /// Approximate heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        let mut bytes = self.raw.capacity() * std::mem::size_of::<Option<RawEntry>>()
            + self.canon.capacity() * std::mem::size_of::<Option<CanonEntry>>()
            + self.raw_map.capacity() * (std::mem::size_of::<(Value, Id)>() + 1)
            + self.canon_map.capacity() * (std::mem::size_of::<(Canon, Id)>() + 1)
            + (self.raw_free.capacity() + self.canon_free.capacity()) * 4;
        for e in self.raw.iter().flatten() {
            bytes += match &e.value {
                Value::Str(s) | Value::Json(s) | Value::BigInt(s) => s.len() + 16,
                _ => 0,
            };
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcounts_free_values() {
        let mut i = Interner::new();
        let a = i.acquire(ValueRef::Str("steady"));
        let b = i.acquire(ValueRef::Str("steady"));
        assert_eq!(a, b);
        let one = i.acquire(ValueRef::Int(1));
        let t = i.acquire(ValueRef::Bool(true));
        assert_ne!(one, t);
        assert_eq!(i.canon_of(one), i.canon_of(t));
        assert_eq!(i.len(), 2 + 1);
        i.release(a);
        assert_eq!(i.len(), 3);
        i.release(b);
        assert_eq!(i.len(), 2);
        i.release(one);
        assert_eq!(i.canon_len(), 1, "True still holds the Int(1) class");
        i.release(t);
        assert_eq!(i.len(), 0);
        assert_eq!(i.canon_len(), 0);
        // ids are reused
        let c = i.acquire(ValueRef::Str("x"));
        assert!(c <= 2);
    }
}
