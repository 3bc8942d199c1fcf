//! `POST /v1/limits/spend` against a real Redis: the Lua script computes what
//! `modelgate_proto::limits` computes over Envoy's shared data (`spend`,
//! `overspend` and `give_back` per bucket, `admit` and `settle` per request),
//! admits all buckets or none, lets debits overshoot, applies a debit sent
//! twice once, and ext-proc rides out Redis going away.
//!
//! Skips only when `redis-server` is not installed (and fails then in CI).

mod common;

use common::{ExtProc, Redis};
use modelgate_proto::limits::{
    self, adjust, overspend, spend, Bucket, BucketSpend, BucketStore, MemoryBuckets, SpendRequest, SpendResponse, Unit,
    Verdict,
};
use proptest::prelude::*;
use redis::Commands;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const MINUTE_US: u64 = 60_000_000;

fn call(ext_proc: &ExtProc, buckets: &[(&str, u64, u64)], debit: bool) -> Vec<Verdict> {
    let buckets = buckets
        .iter()
        .map(|(name, per_minute, cost)| BucketSpend {
            name: name.to_string(),
            per_minute: *per_minute,
            cost: *cost,
            refund: 0,
        })
        .collect();
    send(ext_proc, &SpendRequest { buckets, debit, id: None })
}

fn send(ext_proc: &ExtProc, request: &SpendRequest) -> Vec<Verdict> {
    let body = serde_json::to_vec(request).expect("a request");
    let answer = ext_proc.post("/v1/limits/spend", &body);
    assert_eq!(answer.status, 200, "{answer:?}");
    let answer: SpendResponse = serde_json::from_str(&answer.body).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
    assert_eq!(answer.verdicts.len(), request.buckets.len());
    answer.verdicts
}

fn redis_now(redis: &mut redis::Connection) -> u64 {
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query(redis).expect("TIME");
    seconds * 1_000_000 + micros
}

fn tat(redis: &mut redis::Connection, bucket: &str) -> u64 {
    let stored: Option<u64> = redis.get(bucket).expect("GET");
    stored.unwrap_or(0)
}

/// One call on one bucket, checked against the reference at whatever
/// microsecond of Redis's clock the script ran: some instant between two
/// `TIME`s around the call must give the same verdict and an equal new state.
fn check_one(
    ext_proc: &ExtProc,
    redis: &mut redis::Connection,
    bucket: &str,
    per_minute: u64,
    cost: u64,
    debiting: bool,
) -> Verdict {
    let before = tat(redis, bucket);
    let earliest = redis_now(redis);
    let verdict = call(ext_proc, &[(bucket, per_minute, cost)], debiting)[0];
    let latest = redis_now(redis);
    let after = tat(redis, bucket);
    // Bounds the search below; a loaded machine (a build beside the tests) can stall a call for
    // over a second, which is no wrong verdict.
    assert!(latest - earliest < 10_000_000, "a call took over ten seconds");
    let reference = if debiting { overspend } else { spend };
    // A state at or before now is a full bucket, whatever its value: a refusal leaves it unwritten.
    let matched = (earliest..=latest).any(|now| {
        let (expected, state) = reference(per_minute, before, now, cost);
        expected == verdict && state.max(now) == after.max(now)
    });
    assert!(
        matched,
        "{verdict:?} and state {after} (from {before}) match no instant in [{earliest}, {latest}] \
         for {per_minute}/min, cost {cost}, debit {debiting}; at the earliest the reference says {:?}",
        reference(per_minute, before, earliest, cost)
    );
    verdict
}

/// A call as the filter makes it: an admission reserving that many tokens,
/// or a settlement charging (or, below zero, giving back) that many.
#[derive(Debug, Clone, Copy)]
enum Call {
    Admit(u64),
    Settle(i64),
}

/// One call as the filter makes it, checked against `limits::admit` or
/// `limits::adjust` (what `limits::settle` does per bucket) over Envoy's
/// shared data, at some instant of Redis's clock during the call: the same
/// verdicts (and the same `x-ratelimit-*` they make), and equal states afterwards.
fn check_request(ext_proc: &ExtProc, redis: &mut redis::Connection, buckets: &[Bucket], call: Call) {
    let request = match call {
        Call::Admit(tokens) => Bucket::admission(buckets, tokens),
        Call::Settle(tokens) => SpendRequest {
            buckets: buckets
                .iter()
                .filter(|b| b.unit == Unit::Tokens)
                .map(|b| BucketSpend {
                    name: b.name.clone(),
                    per_minute: b.per_minute,
                    cost: u64::try_from(tokens).unwrap_or(0),
                    refund: if tokens < 0 { tokens.unsigned_abs() } else { 0 },
                })
                .collect(),
            debit: true,
            id: None,
        },
    };
    let before: Vec<u64> = buckets.iter().map(|b| tat(redis, &b.name)).collect();
    let earliest = redis_now(redis);
    let verdicts = send(ext_proc, &request);
    let latest = redis_now(redis);
    let after: Vec<u64> = buckets.iter().map(|b| tat(redis, &b.name)).collect();
    // Bounds the search below; a loaded machine (a build beside the tests) can stall a call for
    // over a second, which is no wrong verdict.
    assert!(latest - earliest < 10_000_000, "a call took over ten seconds");
    let matched = (earliest..=latest).any(|now| {
        let store = MemoryBuckets::default();
        for (bucket, state) in buckets.iter().zip(&before) {
            store.swap(&bucket.name, *state, None);
        }
        let verdicts_match = match call {
            Call::Admit(tokens) => verdicts == limits::admit(&store, buckets, tokens, now),
            Call::Settle(tokens) => {
                let settled = buckets.iter().zip(&before).filter(|(b, _)| b.unit == Unit::Tokens);
                settled.zip(&verdicts).all(|((b, state), v)| {
                    let (expected, new_state) = adjust(b.per_minute, *state, now, tokens);
                    store.swap(&b.name, new_state, store.load(&b.name).1);
                    *v == expected
                })
            }
        };
        verdicts_match
            && buckets.iter().zip(&after).all(|(b, state)| store.load(&b.name).0.max(now) == (*state).max(now))
    });
    assert!(
        matched,
        "{verdicts:?} and states {after:?} (from {before:?}) match no instant in [{earliest}, {latest}] for {request:?}"
    );
}

static BUCKETS: AtomicUsize = AtomicUsize::new(0);

fn fresh_bucket() -> String {
    format!("modelgate.test.{}", BUCKETS.fetch_add(1, Ordering::Relaxed))
}

#[test]
fn the_script_computes_what_spend_computes() {
    let Some(binary) = common::redis_server() else { return };
    let redis_server = Redis::start(binary);
    let ext_proc = ExtProc::start(&["--redis-url", &redis_server.url(), "--redis-timeout-ms", "1000"]);
    let mut redis = redis_server.connection();

    // A burst on a new bucket of 3 a minute: the whole burst, then refusals.
    let bucket = fresh_bucket();
    let burst: Vec<_> = (0..5).map(|_| check_one(&ext_proc, &mut redis, &bucket, 3, 1, false)).collect();
    let seen: Vec<_> = burst.iter().map(|v| (v.allowed, v.limit, v.remaining)).collect();
    assert_eq!(seen, [(true, 3, 2), (true, 3, 1), (true, 3, 0), (false, 3, 0), (false, 3, 0)]);
    for refused in &burst[3..] {
        assert!(refused.retry_after_us > 0 && refused.retry_after_us <= 20_000_000, "{refused:?}");
    }

    // Any state, limit and cost, admitted or debited.
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (
        1u64..=1200,
        // The bucket's state, as an offset from now: new, idle, partly used, over its limit.
        prop_oneof![Just(None), (0u64..3 * MINUTE_US).prop_map(Some)],
        prop::collection::vec((prop_oneof![0u64..4, 0u64..2000], any::<bool>()), 1..6),
    );
    let redis = std::cell::RefCell::new(redis);
    runner
        .run(&strategy, |(per_minute, offset, calls)| {
            let redis = &mut *redis.borrow_mut();
            let bucket = fresh_bucket();
            if let Some(offset) = offset {
                let state = redis_now(redis) + offset;
                let _: () = redis.set(&bucket, state).expect("SET");
            }
            for (cost, debiting) in calls {
                check_one(&ext_proc, redis, &bucket, per_minute, cost, debiting);
            }
            Ok(())
        })
        .unwrap_or_else(|failure| panic!("{failure}"));

    let mut redis = redis.into_inner();
    // Out-of-range limits are clamped as spend clamps them.
    check_one(&ext_proc, &mut redis, &fresh_bucket(), 0, 1, false);
    check_one(&ext_proc, &mut redis, &fresh_bucket(), u64::MAX, 5, false);
    // An absurd cost is refused, and spends nothing.
    let bucket = fresh_bucket();
    let refused = call(&ext_proc, &[(&bucket, 10, u64::MAX)], false)[0];
    assert!(!refused.allowed && refused.retry_after_us > 0, "{refused:?}");
    assert_eq!(tat(&mut redis, &bucket), 0);
}

#[test]
fn calls_as_the_filter_makes_them_equal_admit_and_settle_on_envoys_shared_data() {
    let Some(binary) = common::redis_server() else { return };
    let redis_server = Redis::start(binary);
    let ext_proc = ExtProc::start(&["--redis-url", &redis_server.url(), "--redis-timeout-ms", "1000"]);
    let redis = std::cell::RefCell::new(redis_server.connection());

    let unit = prop_oneof![Just(Unit::Requests), Just(Unit::Tokens)];
    // Each bucket: its unit, its limit, and its state as an offset from now (none: a new bucket).
    let bucket = (unit, 1u64..=300, prop_oneof![Just(None), (0u64..3 * MINUTE_US).prop_map(Some)]);
    // Each call: an admission reserving that many tokens, or a settlement of that many.
    let calls = prop::collection::vec(
        prop_oneof![(0u64..300).prop_map(Call::Admit), (-500i64..500).prop_map(Call::Settle)],
        1..8,
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&(prop::collection::vec(bucket, 1..5), calls), |(specs, calls)| {
            let redis = &mut *redis.borrow_mut();
            let now = redis_now(redis);
            let mut buckets = Vec::new();
            for (unit, per_minute, offset) in specs {
                let name = fresh_bucket();
                if let Some(offset) = offset {
                    let _: () = redis.set(&name, now + offset).expect("SET");
                }
                buckets.push(Bucket { name, unit, per_minute });
            }
            for call in calls {
                check_request(&ext_proc, redis, &buckets, call);
            }
            Ok(())
        })
        .unwrap_or_else(|failure| panic!("{failure}"));
}

#[test]
fn an_admit_spends_from_every_bucket_or_from_none() {
    let Some(binary) = common::redis_server() else { return };
    let redis_server = Redis::start(binary);
    let ext_proc = ExtProc::start(&["--redis-url", &redis_server.url(), "--redis-timeout-ms", "1000"]);
    let mut redis = redis_server.connection();
    let (key, model) = (fresh_bucket(), fresh_bucket());

    let first = call(&ext_proc, &[(&key, 5, 1), (&model, 1, 1)], false);
    assert_eq!(
        first.iter().map(|v| (v.allowed, v.limit, v.remaining)).collect::<Vec<_>>(),
        [(true, 5, 4), (true, 1, 0)]
    );
    let key_state = tat(&mut redis, &key);

    // The model's bucket refuses: the key's would allow, and tells what is left in it, untouched.
    let second = call(&ext_proc, &[(&key, 5, 1), (&model, 1, 1)], false);
    assert_eq!(second.iter().map(|v| (v.allowed, v.remaining)).collect::<Vec<_>>(), [(true, 4), (false, 0)]);
    assert!(second[1].retry_after_us > 0);
    assert_eq!(tat(&mut redis, &key), key_state);

    // Looking (a cost of 0) writes nothing.
    let looked = fresh_bucket();
    assert!(call(&ext_proc, &[(&looked, 5, 0)], false)[0].allowed);
    assert!(!redis.exists::<_, bool>(&looked).expect("EXISTS"));

    // One bucket named twice spends twice.
    let twice = call(&ext_proc, &[(&key, 5, 2), (&key, 5, 2)], false);
    assert_eq!(twice.iter().map(|v| (v.allowed, v.remaining)).collect::<Vec<_>>(), [(true, 2), (true, 0)]);

    // Stored keys expire once their bucket is full again, plus a margin.
    let ttl: i64 = redis.pttl(&key).expect("PTTL");
    assert!(ttl > 59_000 && ttl <= 61_000, "{ttl} ms");
}

#[test]
fn a_debit_overshoots_and_the_bucket_refuses_until_it_has_refilled() {
    let Some(binary) = common::redis_server() else { return };
    let redis_server = Redis::start(binary);
    let ext_proc = ExtProc::start(&["--redis-url", &redis_server.url(), "--redis-timeout-ms", "1000"]);
    let bucket = fresh_bucket();

    // 10 a minute is one every 6 s: 25 units run 150 s ahead, 90 s past the limit.
    // As `overspend`, the verdict is the one on the bucket as it was: full.
    let debited = call(&ext_proc, &[(&bucket, 10, 25)], true)[0];
    assert_eq!((debited.allowed, debited.limit, debited.remaining, debited.reset_us), (false, 10, 10, 0));
    assert_eq!(debited.retry_after_us, 90_000_000);

    let look = call(&ext_proc, &[(&bucket, 10, 0)], false)[0];
    assert!(!look.allowed, "{look:?}");
    assert!(look.retry_after_us > 0 && look.retry_after_us <= debited.retry_after_us, "{look:?}");
    let ttl: i64 = redis_server.connection().pttl(&bucket).expect("PTTL");
    assert!(ttl > 150_000 && ttl <= 151_000, "{ttl} ms");
}

#[test]
fn a_debit_sent_again_with_its_id_is_applied_once() {
    let Some(binary) = common::redis_server() else { return };
    let redis_server = Redis::start(binary);
    let ext_proc = ExtProc::start(&["--redis-url", &redis_server.url(), "--redis-timeout-ms", "1000"]);
    let mut redis = redis_server.connection();
    let bucket = fresh_bucket();
    let debit = |id: &str, cost: u64, refund: u64| SpendRequest {
        buckets: vec![BucketSpend { name: bucket.clone(), per_minute: 60, cost, refund }],
        debit: true,
        id: Some(id.into()),
    };

    // 30 tokens at 60 a minute: the bucket runs 30 s ahead, once however often the debit is sent.
    send(&ext_proc, &debit("worker-1", 30, 0));
    let once = tat(&mut redis, &bucket);
    let again = send(&ext_proc, &debit("worker-1", 30, 0))[0];
    assert_eq!(tat(&mut redis, &bucket), once, "the repeat changed nothing");
    assert!(again.allowed && again.remaining <= 30 && again.remaining >= 29, "the repeat only looks: {again:?}");
    let ttl: i64 = redis.pttl("modelgate.debit.worker-1").expect("PTTL");
    assert!(ttl > 590_000 && ttl <= 600_000, "the id is remembered ten minutes: {ttl} ms");

    // Another id is another debit: a refund of 20 tokens, given back once.
    send(&ext_proc, &debit("worker-2", 0, 20));
    let refunded = tat(&mut redis, &bucket);
    assert!(once - refunded == 20_000_000, "{once} then {refunded}");
    send(&ext_proc, &debit("worker-2", 0, 20));
    assert_eq!(tat(&mut redis, &bucket), refunded);

    // Ids belong to debits, and stay short and plain.
    for (bad, is_debit) in [("x", false), ("", true), ("a b", true), (&"x".repeat(65)[..], true)] {
        let request = SpendRequest { debit: is_debit, ..debit(bad, 1, 0) };
        let answer = ext_proc.post("/v1/limits/spend", &serde_json::to_vec(&request).unwrap());
        assert_eq!(answer.status, 400, "{bad:?}: {answer:?}");
        assert_eq!(answer.json()["error"]["param"], "id");
    }
    assert_eq!(tat(&mut redis, &bucket), refunded);
}

#[test]
fn redis_going_away_answers_503_and_coming_back_recovers() {
    let Some(binary) = common::redis_server() else { return };
    // ext-proc starts before Redis does: it connects once Redis is there.
    let mut redis_server = Redis::start(binary);
    redis_server.kill();
    let mut ext_proc = ExtProc::start(&["--redis-url", &redis_server.url(), "--redis-timeout-ms", "50"]);
    let request =
        serde_json::to_vec(&json!({"buckets": [{"name": fresh_bucket(), "per_minute": 600, "cost": 1}]})).unwrap();

    let unavailable = |ext_proc: &ExtProc| {
        let answer = ext_proc.post("/v1/limits/spend", &request);
        assert_eq!(answer.status, 503, "{answer:?}");
        let error = answer.json()["error"].clone();
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("server_error"), Some("limit_store_unavailable"))
        );
    };
    let recovers = |ext_proc: &ExtProc| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let answer = ext_proc.post("/v1/limits/spend", &request);
            match answer.status {
                200 => return,
                503 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => panic!("not recovered: {answer:?}"),
            }
        }
    };

    unavailable(&ext_proc);
    redis_server.restart();
    recovers(&ext_proc);

    redis_server.kill();
    let started = Instant::now();
    unavailable(&ext_proc);
    unavailable(&ext_proc);
    assert!(started.elapsed() < Duration::from_secs(2), "each refusal waits at most the timeout");
    let errors = ext_proc.get("/metrics").body;
    let count = errors
        .lines()
        .find_map(|l| l.strip_prefix("modelgate_limit_store_errors_total "))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(count.is_some_and(|n| n >= 3), "{errors}");

    redis_server.restart();
    recovers(&ext_proc);
    assert!(matches!(ext_proc.process.try_wait(), Ok(None)), "the same ext-proc process served throughout");
}
