//! A map bounded in bytes, whose entries used least recently go first, and
//! each of which lives until its own expiry: ext-proc's cache in memory, and
//! each Envoy worker's local copies of cached answers.
//!
//! Past the bound, the entries used least recently go first, whatever their
//! expiry (a live entry may go before an expired one used later); an expired
//! entry is dropped when read, or when its turn in that order comes. Time is
//! passed in (`now_ms`), so tests move it.

use std::collections::{BTreeMap, HashMap};

/// What an entry costs beyond its key (kept twice) and value: the map's and the order's bookkeeping.
pub const ENTRY_OVERHEAD: usize = 96;

/// A value's size, as the bound counts it.
pub trait Weigh {
    fn weight(&self) -> usize;
}

impl Weigh for Vec<u8> {
    fn weight(&self) -> usize {
        self.len()
    }
}

impl Weigh for String {
    fn weight(&self) -> usize {
        self.len()
    }
}

#[derive(Debug)]
pub struct Lru<V> {
    max_bytes: usize,
    entries: HashMap<String, Entry<V>>,
    /// Keys by their last use, oldest first.
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: usize,
}

#[derive(Debug)]
struct Entry<V> {
    value: V,
    expires_ms: u64,
    used: u64,
}

/// What `value` under `key` costs against the bound.
pub fn cost<V: Weigh>(key: &str, value: &V) -> usize {
    2 * key.len() + value.weight() + ENTRY_OVERHEAD
}

impl<V> Lru<V> {
    pub fn new(max_bytes: usize) -> Self {
        Lru { max_bytes, entries: HashMap::new(), order: BTreeMap::new(), tick: 0, bytes: 0 }
    }
}

/// Keeps nothing.
impl<V> Default for Lru<V> {
    fn default() -> Self {
        Lru::new(0)
    }
}

impl<V: Weigh> Lru<V> {
    /// Bytes held now, as the bound counts them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The live value under `key`, now the most recently used; an expired one is dropped.
    pub fn get(&mut self, key: &str, now_ms: u64) -> Option<&V> {
        let expired = self.entries.get(key)?.expires_ms <= now_ms;
        if expired {
            self.remove(key);
            return None;
        }
        self.tick += 1;
        let tick = self.tick;
        let entry = self.entries.get_mut(key)?;
        if let Some(name) = self.order.remove(&entry.used) {
            self.order.insert(tick, name);
        }
        entry.used = tick;
        Some(&entry.value)
    }

    /// Keeps `value` until `expires_ms`, then makes room for it; a value larger than the whole bound is not kept.
    pub fn put(&mut self, key: &str, value: V, expires_ms: u64) {
        self.remove(key);
        let size = cost(key, &value);
        if size > self.max_bytes {
            return;
        }
        while self.bytes + size > self.max_bytes {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            if let Some(entry) = self.entries.remove(&oldest) {
                self.bytes -= cost(&oldest, &entry.value);
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, key.to_string());
        self.entries.insert(key.to_string(), Entry { value, expires_ms, used: self.tick });
        self.bytes += size;
    }

    pub fn remove(&mut self, key: &str) {
        if let Some(entry) = self.entries.remove(key) {
            self.order.remove(&entry.used);
            self.bytes -= cost(key, &entry.value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MINUTE: u64 = 60_000;

    #[test]
    fn entries_expire_at_their_time() {
        let mut lru = Lru::new(1 << 20);
        lru.put("a", b"1".to_vec(), MINUTE);
        assert_eq!(lru.get("a", MINUTE - 1), Some(&b"1".to_vec()));
        assert_eq!(lru.get("a", MINUTE), None);
        assert_eq!(lru.bytes(), 0);
    }

    #[test]
    fn the_least_recently_used_go_first_past_the_bound() {
        let entry = cost("k0", &vec![0; 100]);
        let mut lru = Lru::new(3 * entry);
        for key in ["k0", "k1", "k2"] {
            lru.put(key, vec![0; 100], MINUTE);
        }
        // k0 read: k1 is now the oldest.
        assert!(lru.get("k0", 1).is_some());
        lru.put("k3", vec![0; 100], MINUTE);
        assert!(lru.get("k1", 3).is_none());
        for key in ["k0", "k2", "k3"] {
            assert!(lru.get(key, 3).is_some(), "{key}");
        }
        // One entry twice as large takes two places.
        lru.put("k4", vec![0; 100 + entry], MINUTE);
        assert_eq!(lru.bytes(), 3 * entry);
        assert!(lru.get("k4", 5).is_some());
        // Larger than the whole bound: not kept, and nothing else is evicted for it.
        lru.put("huge", vec![0; 3 * entry], MINUTE);
        assert!(lru.get("huge", 7).is_none());
        assert!(lru.get("k4", 7).is_some());
    }

    proptest! {
        /// Whatever is put, read and removed, the bytes held stay within the
        /// bound and equal what the entries cost.
        #[test]
        fn the_bound_holds(ops in proptest::collection::vec((0u8..3, 0u8..8, 0usize..300, 0u64..50), 1..200)) {
            let max = 1000;
            let mut lru = Lru::new(max);
            for (now, (op, key, len, ttl)) in ops.into_iter().enumerate() {
                let (key, now) = (format!("k{key}"), now as u64);
                match op {
                    0 => lru.put(&key, vec![1; len], now + ttl),
                    1 => { lru.get(&key, now); }
                    _ => lru.remove(&key),
                }
                prop_assert!(lru.bytes <= max);
                let counted: usize = lru.entries.iter().map(|(k, e)| cost(k, &e.value)).sum();
                prop_assert_eq!(lru.bytes, counted);
                prop_assert_eq!(lru.order.len(), lru.entries.len());
            }
        }
    }
}
