//! The store in memory: one LRU over answers and idempotency records alike,
//! bounded in bytes (keys, values and bookkeeping). Past the bound, the
//! entries used least recently go first, whatever their TTL (a live entry
//! may go before an expired one used later); an expired entry is dropped
//! when read, or when its turn in that order comes.
//!
//! Every operation holds one lock, so a claim is atomic. Time is passed in
//! (`now_ms`), so tests move it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// What an entry costs beyond its key (kept twice) and value: the map's and the order's bookkeeping.
const ENTRY_OVERHEAD: usize = 96;

pub struct Memory {
    max_bytes: usize,
    lru: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<String, Entry>,
    /// Keys by their last use, oldest first.
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: usize,
}

struct Entry {
    value: Vec<u8>,
    expires_ms: u64,
    used: u64,
}

fn cost(key: &str, value: &[u8]) -> usize {
    2 * key.len() + value.len() + ENTRY_OVERHEAD
}

impl Memory {
    pub fn new(max_bytes: usize) -> Self {
        Memory { max_bytes, lru: Mutex::new(Lru::default()) }
    }

    /// Bytes held now, as the bound counts them.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, key: &str, now_ms: u64) -> Option<Vec<u8>> {
        self.lock().get(key, now_ms).map(<[u8]>::to_vec)
    }

    pub fn put(&self, key: &str, value: &[u8], ttl_ms: u64, now_ms: u64) {
        self.lock().put(key, value, now_ms.saturating_add(ttl_ms), self.max_bytes);
    }

    pub fn claim(&self, key: &str, claim: &[u8], lease_ms: u64, now_ms: u64) -> Option<Vec<u8>> {
        let mut lru = self.lock();
        if let Some(there) = lru.get(key, now_ms) {
            return Some(there.to_vec());
        }
        lru.put(key, claim, now_ms.saturating_add(lease_ms), self.max_bytes);
        None
    }

    pub fn complete(&self, key: &str, holder: &[u8], value: &[u8], ttl_ms: u64, now_ms: u64) {
        let mut lru = self.lock();
        if lru.get(key, now_ms).is_none_or(|there| there.starts_with(holder)) {
            lru.put(key, value, now_ms.saturating_add(ttl_ms), self.max_bytes);
        }
    }

    pub fn release(&self, key: &str, holder: &[u8], now_ms: u64) {
        let mut lru = self.lock();
        if lru.get(key, now_ms).is_some_and(|there| there.starts_with(holder)) {
            lru.remove(key);
        }
    }
}

impl Lru {
    /// The live value under `key`, now the most recently used; an expired one is dropped.
    fn get(&mut self, key: &str, now_ms: u64) -> Option<&[u8]> {
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
    fn put(&mut self, key: &str, value: &[u8], expires_ms: u64, max_bytes: usize) {
        self.remove(key);
        let size = cost(key, value);
        if size > max_bytes {
            return;
        }
        while self.bytes + size > max_bytes {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            if let Some(entry) = self.entries.remove(&oldest) {
                self.bytes -= cost(&oldest, &entry.value);
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, key.to_string());
        self.entries.insert(key.to_string(), Entry { value: value.to_vec(), expires_ms, used: self.tick });
        self.bytes += size;
    }

    fn remove(&mut self, key: &str) {
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
    fn entries_expire_by_their_ttl() {
        let memory = Memory::new(1 << 20);
        memory.put("a", b"1", MINUTE, 0);
        assert_eq!(memory.get("a", MINUTE - 1).as_deref(), Some(&b"1"[..]));
        assert_eq!(memory.get("a", MINUTE), None);
        assert_eq!(memory.bytes(), 0);
    }

    #[test]
    fn the_least_recently_used_go_first_past_the_bound() {
        let entry = cost("k0", &[0; 100]);
        let memory = Memory::new(3 * entry);
        for key in ["k0", "k1", "k2"] {
            memory.put(key, &[0; 100], MINUTE, 0);
        }
        // k0 read: k1 is now the oldest.
        assert!(memory.get("k0", 1).is_some());
        memory.put("k3", &[0; 100], MINUTE, 2);
        assert!(memory.get("k1", 3).is_none());
        for key in ["k0", "k2", "k3"] {
            assert!(memory.get(key, 3).is_some(), "{key}");
        }
        // One entry twice as large takes two places.
        memory.put("k4", &vec![0; 100 + entry], MINUTE, 4);
        assert_eq!(memory.bytes(), 3 * entry);
        assert!(memory.get("k4", 5).is_some());
        // Larger than the whole bound: not kept, and nothing else is evicted for it.
        memory.put("huge", &vec![0; 3 * entry], MINUTE, 6);
        assert!(memory.get("huge", 7).is_none());
        assert!(memory.get("k4", 7).is_some());
    }

    #[test]
    fn a_claim_is_taken_once_and_its_lease_ends() {
        let memory = Memory::new(1 << 20);
        assert_eq!(memory.claim("i", b"Ca:d", 10 * MINUTE, 0), None);
        assert_eq!(memory.claim("i", b"Cb:d", 10 * MINUTE, 10 * MINUTE - 1).as_deref(), Some(&b"Ca:d"[..]));
        // The first request is taken as lost after its lease.
        assert_eq!(memory.claim("i", b"Cb:d", 10 * MINUTE, 10 * MINUTE), None);
        // Only the holder completes or lets go.
        memory.release("i", b"Ca:", 10 * MINUTE + 1);
        memory.complete("i", b"Ca:", b"Dfirst", 60 * MINUTE, 10 * MINUTE + 1);
        assert_eq!(memory.get("i", 10 * MINUTE + 2).as_deref(), Some(&b"Cb:d"[..]));
        memory.complete("i", b"Cb:", b"Dsecond", 60 * MINUTE, 10 * MINUTE + 2);
        assert_eq!(memory.get("i", 10 * MINUTE + 3).as_deref(), Some(&b"Dsecond"[..]));
        memory.release("i", b"Cb:", 10 * MINUTE + 3);
        assert!(memory.get("i", 10 * MINUTE + 4).is_some());
        // A claim lost from the store is completed all the same.
        memory.complete("j", b"Cc:", b"Dthird", MINUTE, 0);
        assert_eq!(memory.get("j", 1).as_deref(), Some(&b"Dthird"[..]));
        memory.claim("k", b"Cd:x", MINUTE, 0);
        memory.release("k", b"Cd:", 1);
        assert_eq!(memory.claim("k", b"Ce:x", MINUTE, 2), None);
    }

    proptest! {
        /// Whatever is put, read and claimed, the bytes held stay within the
        /// bound and equal what the entries cost.
        #[test]
        fn the_bound_holds(ops in proptest::collection::vec((0u8..3, 0u8..8, 0usize..300, 0u64..50), 1..200)) {
            let max = 1000;
            let memory = Memory::new(max);
            for (now, (op, key, len, ttl)) in ops.into_iter().enumerate() {
                let (key, now) = (format!("k{key}"), now as u64);
                match op {
                    0 => memory.put(&key, &vec![1; len], ttl, now),
                    1 => { memory.get(&key, now); }
                    _ => { memory.claim(&key, &vec![2; len], ttl, now); }
                }
                let lru = memory.lock();
                prop_assert!(lru.bytes <= max);
                let counted: usize = lru.entries.iter().map(|(k, e)| cost(k, &e.value)).sum();
                prop_assert_eq!(lru.bytes, counted);
                prop_assert_eq!(lru.order.len(), lru.entries.len());
            }
        }
    }
}
