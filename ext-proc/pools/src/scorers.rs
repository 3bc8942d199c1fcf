//! The scorers: each rates one replica between 0 (worst) and 1 (best), from
//! the replica's state and the request; the picker sums them by weight:
//!
//! score = Σ weight(scorer) × scorer(replica)
//!
//! and takes the highest score, ties broken at random.

use crate::config::{Strategy, Weights};
use std::hash::{DefaultHasher, Hash, Hasher};

/// Fewer is better, relative to the busiest candidate: `(1 + max − x) / (1 + max)`.
/// One request more or less matters at low load and little at high load,
/// as it does to an engine's batch.
fn fewer_is_better(value: u64, max: u64) -> f64 {
    let max = max.max(value) as f64;
    (1.0 + max - value as f64) / (1.0 + max)
}

/// The requests the picker has in flight on the replica, against the most any candidate has.
pub fn least_requests(in_flight: u64, most_in_flight: u64) -> f64 {
    fewer_is_better(in_flight, most_in_flight)
}

/// The requests waiting in the replica's queue, against the longest queue among the candidates.
pub fn queue(waiting: u64, most_waiting: u64) -> f64 {
    fewer_is_better(waiting, most_waiting)
}

/// The share of the replica's KV cache that is free.
pub fn kv_cache(usage: f64) -> f64 {
    if usage.is_nan() {
        1.0
    } else {
        1.0 - usage.clamp(0.0, 1.0)
    }
}

/// The share of the prompt's blocks, from the first, that the replica probably holds.
pub fn prefix(matched: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        (matched.min(total) as f64) / total as f64
    }
}

/// 1 when the model is a LoRA adapter the replica is already running or queuing.
pub fn lora(adapter_active: bool) -> f64 {
    if adapter_active {
        1.0
    } else {
        0.0
    }
}

/// Rendezvous hashing of a session over the candidates: the same replica wins
/// for a session as long as it is a candidate, and when it is not, the
/// session's other requests move to one other replica, not all over.
pub fn session_weight(session: &[u8], address: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    session.hash(&mut hasher);
    address.hash(&mut hasher);
    hasher.finish()
}

/// 1 for the session's replica (the highest [`session_weight`]), 0 for the others.
pub fn session(weight: u64, highest_weight: u64) -> f64 {
    if weight == highest_weight {
        1.0
    } else {
        0.0
    }
}

/// A uniform draw: the baseline, and some spread when other scores are level.
pub fn random() -> f64 {
    fastrand::f64()
}

/// The weight of each scorer, resolved from a strategy and its overrides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved {
    pub least_requests: f64,
    pub queue: f64,
    pub kv_cache: f64,
    pub prefix: f64,
    pub lora: f64,
    pub session: f64,
    pub random: f64,
}

impl Resolved {
    /// The strategy's preset, each weight replaced by the override given for it.
    pub fn new(strategy: Strategy, overrides: &Weights) -> Self {
        let preset = match strategy {
            Strategy::Random => Resolved { random: 1.0, ..Resolved::ZERO },
            Strategy::LeastRequests => Resolved { least_requests: 1.0, ..Resolved::ZERO },
            Strategy::PrefixCache => Resolved { prefix: 3.0, least_requests: 1.0, ..Resolved::ZERO },
            Strategy::Combined => Resolved {
                prefix: 3.0,
                queue: 2.0,
                least_requests: 1.0,
                kv_cache: 1.0,
                lora: 1.0,
                session: 1.0,
                random: 0.0,
            },
        };
        let pick = |preset: f64, given: Option<f64>| given.unwrap_or(preset);
        Resolved {
            least_requests: pick(preset.least_requests, overrides.least_requests),
            queue: pick(preset.queue, overrides.queue),
            kv_cache: pick(preset.kv_cache, overrides.kv_cache),
            prefix: pick(preset.prefix, overrides.prefix),
            lora: pick(preset.lora, overrides.lora),
            session: pick(preset.session, overrides.session),
            random: pick(preset.random, overrides.random),
        }
    }

    /// Every weight, by its name in the configuration.
    pub fn named(&self) -> [(&'static str, f64); 7] {
        [
            ("least_requests", self.least_requests),
            ("queue", self.queue),
            ("kv_cache", self.kv_cache),
            ("prefix", self.prefix),
            ("lora", self.lora),
            ("session", self.session),
            ("random", self.random),
        ]
    }

    const ZERO: Resolved =
        Resolved { least_requests: 0.0, queue: 0.0, kv_cache: 0.0, prefix: 0.0, lora: 0.0, session: 0.0, random: 0.0 };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_requests_and_queue_prefer_fewer() {
        assert_eq!(least_requests(0, 0), 1.0, "all idle: all best");
        assert_eq!(least_requests(0, 1), 1.0);
        assert_eq!(least_requests(1, 1), 0.5);
        assert!(least_requests(10, 11) > least_requests(11, 11));
        assert!(least_requests(10, 11) - least_requests(11, 11) < 0.1, "one more matters little at high load");
        assert_eq!(queue(4, 2), queue(4, 4), "a max below the value is the value");
        assert!(queue(0, 8) > queue(3, 8));
        for (x, max) in [(0, 0), (5, 5), (u64::MAX, u64::MAX), (3, 1)] {
            assert!((0.0..=1.0).contains(&queue(x, max)));
        }
    }

    #[test]
    fn kv_cache_prefers_free_cache() {
        assert_eq!(kv_cache(0.0), 1.0);
        assert_eq!(kv_cache(0.75), 0.25);
        assert_eq!(kv_cache(1.5), 0.0);
        assert_eq!(kv_cache(f64::NAN), 1.0);
    }

    #[test]
    fn prefix_is_the_share_matched() {
        assert_eq!(prefix(0, 0), 0.0);
        assert_eq!(prefix(3, 4), 0.75);
        assert_eq!(prefix(5, 4), 1.0);
    }

    #[test]
    fn lora_prefers_an_active_adapter() {
        assert_eq!((lora(true), lora(false)), (1.0, 0.0));
    }

    #[test]
    fn session_picks_one_replica_and_keeps_it() {
        let replicas = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"];
        fn winner<'a>(id: &[u8], among: &[&'a str]) -> &'a str {
            let weights: Vec<u64> = among.iter().map(|a| session_weight(id, a)).collect();
            let highest = *weights.iter().max().unwrap();
            let scores: Vec<f64> = weights.iter().map(|w| session(*w, highest)).collect();
            assert_eq!(scores.iter().filter(|s| **s == 1.0).count(), 1);
            among[scores.iter().position(|s| *s == 1.0).unwrap()]
        }
        let first = winner(b"user-42", &replicas);
        assert_eq!(winner(b"user-42", &replicas), first);
        // Removing another replica keeps the session where it was.
        let others: Vec<&str> = replicas.iter().copied().filter(|r| *r != first).collect();
        let kept: Vec<&str> = replicas.iter().copied().filter(|r| *r != others[0]).collect();
        assert_eq!(winner(b"user-42", &kept), first);
        // Sessions spread over the replicas.
        let spread: std::collections::BTreeSet<&str> =
            (0..64).map(|i| winner(format!("s{i}").as_bytes(), &replicas)).collect();
        assert_eq!(spread.len(), 3);
    }

    #[test]
    fn random_is_in_range() {
        assert!((0..100).map(|_| random()).all(|r| (0.0..1.0).contains(&r)));
    }

    #[test]
    fn presets_and_overrides() {
        let random = Resolved::new(Strategy::Random, &Weights::default());
        assert_eq!(random, Resolved { random: 1.0, ..Resolved::ZERO });
        let tuned =
            Resolved::new(Strategy::Combined, &Weights { prefix: Some(5.0), session: Some(0.0), ..Weights::default() });
        assert_eq!((tuned.prefix, tuned.session, tuned.queue), (5.0, 0.0, 2.0));
    }
}
