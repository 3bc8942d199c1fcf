//! The store in memory: one [`Lru`] over answers and idempotency records
//! alike, bounded in bytes (keys, values and bookkeeping).
//!
//! Every operation holds one lock, so a claim is atomic. Time is passed in
//! (`now_ms`), so tests move it.

use modelgate_proto::lru::Lru;
use std::sync::Mutex;

pub struct Memory {
    lru: Mutex<Lru<Vec<u8>>>,
}

impl Memory {
    pub fn new(max_bytes: usize) -> Self {
        Memory { lru: Mutex::new(Lru::new(max_bytes)) }
    }

    /// Bytes held now, as the bound counts them.
    pub fn bytes(&self) -> usize {
        self.lock().bytes()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru<Vec<u8>>> {
        self.lru.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, key: &str, now_ms: u64) -> Option<Vec<u8>> {
        self.lock().get(key, now_ms).cloned()
    }

    pub fn put(&self, key: &str, value: &[u8], ttl_ms: u64, now_ms: u64) {
        self.lock().put(key, value.to_vec(), now_ms.saturating_add(ttl_ms));
    }

    pub fn claim(&self, key: &str, claim: &[u8], lease_ms: u64, now_ms: u64) -> Option<Vec<u8>> {
        let mut lru = self.lock();
        if let Some(there) = lru.get(key, now_ms) {
            return Some(there.clone());
        }
        lru.put(key, claim.to_vec(), now_ms.saturating_add(lease_ms));
        None
    }

    pub fn complete(&self, key: &str, holder: &[u8], value: &[u8], ttl_ms: u64, now_ms: u64) {
        let mut lru = self.lock();
        if lru.get(key, now_ms).is_none_or(|there| there.starts_with(holder)) {
            lru.put(key, value.to_vec(), now_ms.saturating_add(ttl_ms));
        }
    }

    pub fn release(&self, key: &str, holder: &[u8], now_ms: u64) {
        let mut lru = self.lock();
        if lru.get(key, now_ms).is_some_and(|there| there.starts_with(holder)) {
            lru.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: u64 = 60_000;

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
}
