//! Cached answers and idempotency records, in one store: in memory (an LRU
//! bounded in bytes, entries expiring by their TTL), or in Redis, shared by
//! every gateway (`--redis-url`).
//!
//! Keys: `cache:<cache key>` for an answer ([`modelgate_proto::replay::cache_key`]),
//! `idem:<record id>` for an `Idempotency-Key` ([`record_id`]); Redis puts
//! `modelgate:` before them. Values are bytes, the same in both stores:
//!
//! - an answer: a JSON line ([`CachedHead`]: its usage and expiry), `\n`, the answer's
//!   whole form as JSON ([`modelgate_proto::replay::whole_answer`]);
//! - a claim on an idempotency key, while its first request runs: `C`, the
//!   claim's token, `:`, the request's digest. Only the holder of the token
//!   completes or lets go of it ([`Claim`]);
//! - the first request's answer: `D`, a JSON line ([`DoneHead`]), `\n`, the
//!   bytes the client got.

mod memory;
mod redis;

pub use self::memory::Memory;
pub use self::redis::RedisStore;

use modelgate_proto::usage::Usage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// How long a claim holds an idempotency key while its first request runs:
/// past it, the first request is taken as lost, and a repeat may claim anew.
pub const CLAIM_LEASE_MS: u64 = 10 * 60_000;

/// The store did not answer (Redis down, or slower than its timeout).
#[derive(Debug)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The store of cached answers and idempotency records.
pub enum Store {
    Memory(Memory),
    Redis(RedisStore),
}

impl Store {
    /// The value under `key`, unless it expired by `now_ms`.
    pub async fn get(&self, key: &str, now_ms: u64) -> Result<Option<Vec<u8>>> {
        match self {
            Store::Memory(memory) => Ok(memory.get(key, now_ms)),
            Store::Redis(redis) => redis.get(key).await,
        }
    }

    /// Keeps `value` under `key` for `ttl_ms`, replacing what was there.
    pub async fn put(&self, key: &str, value: &[u8], ttl_ms: u64, now_ms: u64) -> Result<()> {
        match self {
            Store::Memory(memory) => {
                memory.put(key, value, ttl_ms, now_ms);
                Ok(())
            }
            Store::Redis(redis) => redis.put(key, value, ttl_ms).await,
        }
    }

    /// Puts `claim` under `key` for `lease_ms` if nothing is there, at once:
    /// `None` when it did, else what is there.
    pub async fn claim(&self, key: &str, claim: &[u8], lease_ms: u64, now_ms: u64) -> Result<Option<Vec<u8>>> {
        match self {
            Store::Memory(memory) => Ok(memory.claim(key, claim, lease_ms, now_ms)),
            Store::Redis(redis) => redis.claim(key, claim, lease_ms).await,
        }
    }

    /// Replaces the claim whose value starts with `holder` by `value` for
    /// `ttl_ms`, or puts it where nothing is left (the claim expired); what
    /// another request put there since stays.
    pub async fn complete(&self, key: &str, holder: &[u8], value: &[u8], ttl_ms: u64, now_ms: u64) -> Result<()> {
        match self {
            Store::Memory(memory) => {
                memory.complete(key, holder, value, ttl_ms, now_ms);
                Ok(())
            }
            Store::Redis(redis) => redis.complete(key, holder, value, ttl_ms).await,
        }
    }

    /// Deletes the claim whose value starts with `holder`, if it is still there.
    pub async fn release(&self, key: &str, holder: &[u8], now_ms: u64) -> Result<()> {
        match self {
            Store::Memory(memory) => {
                memory.release(key, holder, now_ms);
                Ok(())
            }
            Store::Redis(redis) => redis.release(key, holder).await,
        }
    }
}

/// A cached answer's store key.
pub fn cache_entry_key(cache_key: &str) -> String {
    format!("cache:{cache_key}")
}

/// An idempotency record's store key.
pub fn idempotency_key(record_id: &str) -> String {
    format!("idem:{record_id}")
}

/// The id of `owner`'s idempotency record for the client's `key`: a hex
/// SHA-256 over both, each length-prefixed so no two pairs meet.
pub fn record_id(owner: &str, key: &str) -> String {
    let mut hash = Sha256::new();
    for part in [owner, key] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hex::encode(hash.finalize())
}

/// A fresh unguessable token, 32 hex digits: whose claim it is.
pub fn claim_token() -> String {
    let mut random = [0u8; 16];
    if getrandom::fill(&mut random).is_err() {
        // No system randomness: unique within this process, which is what fencing a claim needs most.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let next = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        random[..8].copy_from_slice(&next.to_be_bytes());
        random[8..].copy_from_slice(&modelgate_proto::clock::unix_millis().to_be_bytes());
    }
    hex::encode(random)
}

/// What is kept beside a cached answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CachedHead {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// When the entry expires (ms since the epoch, by ext-proc's clock): a
    /// replay tells the worker how long its own copy may live. 0 in entries
    /// kept before it was recorded, which no worker copies.
    #[serde(default)]
    pub expires_ms: u64,
}

/// A cached answer's bytes: its head line, then its whole form.
pub fn encode_cached(head: &CachedHead, whole: &serde_json::Value) -> Vec<u8> {
    modelgate_proto::gate::join_line(head, &serde_json::to_vec(whole).unwrap_or_default())
}

/// A cached answer from its bytes; `None` for bytes of another shape.
pub fn decode_cached(bytes: &[u8]) -> Option<(CachedHead, serde_json::Value)> {
    let (head, whole) = split_line(bytes)?;
    Some((serde_json::from_slice(head).ok()?, serde_json::from_slice(whole).ok()?))
}

/// A claim's holder: the prefix of its value that only the claimant knows.
pub fn claim_holder(token: &str) -> String {
    format!("C{token}:")
}

/// The value of a claim by `token` for a request of `digest`.
pub fn encode_claim(token: &str, digest: &str) -> Vec<u8> {
    format!("{}{digest}", claim_holder(token)).into_bytes()
}

/// The first answer of an idempotency key, as kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoneHead {
    pub digest: String,
    pub status: u16,
    pub content_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

pub fn encode_done(head: &DoneHead, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![b'D'];
    out.extend_from_slice(&modelgate_proto::gate::join_line(head, bytes));
    out
}

/// An idempotency record, as read.
#[derive(Debug, PartialEq)]
pub enum Record<'a> {
    /// Its first request is running.
    Claimed { digest: &'a str },
    /// Its first request ended with this answer.
    Done { head: DoneHead, bytes: &'a [u8] },
}

/// An idempotency record from its bytes; `None` for bytes of another shape.
pub fn decode_record(bytes: &[u8]) -> Option<Record<'_>> {
    match bytes.split_first()? {
        (b'C', rest) => {
            let (_token, digest) = std::str::from_utf8(rest).ok()?.split_once(':')?;
            Some(Record::Claimed { digest })
        }
        (b'D', rest) => {
            let (head, bytes) = split_line(rest)?;
            Some(Record::Done { head: serde_json::from_slice(head).ok()?, bytes })
        }
        _ => None,
    }
}

fn split_line(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.iter().position(|&b| b == b'\n')?;
    Some((&bytes[..end], &bytes[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_read_back_as_written() {
        let claim = encode_claim(&claim_token(), "d1");
        assert_eq!(decode_record(&claim), Some(Record::Claimed { digest: "d1" }));
        let head = DoneHead {
            digest: "d1".into(),
            status: 200,
            content_type: "text/event-stream".into(),
            usage: Some(Usage { prompt_tokens: 3, completion_tokens: 4 }),
        };
        let done = encode_done(&head, b"data: {}\n\ndata: [DONE]\n\n");
        assert_eq!(decode_record(&done), Some(Record::Done { head, bytes: b"data: {}\n\ndata: [DONE]\n\n" }));
        for junk in [&b""[..], b"X", b"Cno-colon", b"D{}", b"Dnot json\n"] {
            assert_eq!(decode_record(junk), None, "{junk:?}");
        }
        let whole = json!({"object": "chat.completion", "choices": []});
        let head = CachedHead { usage: Some(Usage { prompt_tokens: 1, completion_tokens: 2 }), expires_ms: 5 };
        assert_eq!(decode_cached(&encode_cached(&head, &whole)), Some((head, whole)));
        assert_eq!(decode_cached(b"{}"), None);
    }

    #[test]
    fn record_ids_keep_owners_apart() {
        assert_eq!(record_id("alice", "k1"), record_id("alice", "k1"));
        assert_ne!(record_id("alice", "k1"), record_id("alice", "k2"));
        assert_ne!(record_id("ab", "c"), record_id("a", "bc"));
        assert_eq!(record_id("", "k").len(), 64);
        assert_ne!(claim_token(), claim_token());
    }
}
