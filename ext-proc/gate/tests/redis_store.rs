//! The cache's store in a real `redis-server` (started on a free loopback
//! port; the tests skip only when it is not installed, and fail then in CI):
//! what the memory store's unit tests hold, across gateways, and a Redis
//! gone mid-run.

use modelgate_gate::budgets::Budgets;
use modelgate_gate::cache::{RedisStore, Store};
use modelgate_gate::gate::Gate;
use modelgate_proto::config::CacheMode;
use modelgate_proto::gate::{CacheAsk, GateRequest, GateVerdict, IdempotencyAsk, ReplaySource, StoreRequest};
use serde_json::json;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A throwaway Redis without persistence; killed on drop.
struct Redis {
    binary: PathBuf,
    port: u16,
    process: Option<Child>,
}

impl Redis {
    /// None when the test skips (no `redis-server`).
    fn start() -> Option<Redis> {
        let binary = std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join("redis-server")).find(|p| p.is_file()));
        let Some(binary) = binary else {
            assert!(std::env::var_os("CI").is_none(), "redis-server is not on the PATH, and .ci/run installs it");
            eprintln!("SKIPPED: redis-server is not on the PATH");
            return None;
        };
        // Another process may take the port between choosing and binding it: a few tries.
        let started = (0..5).find_map(|_| {
            let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
            let mut redis = Redis { binary: binary.clone(), port, process: None };
            redis.spawn().then_some(redis)
        });
        Some(started.expect("redis-server exited at start five times"))
    }

    fn spawn(&mut self) -> bool {
        // Kept at once, so that it is killed and waited for on drop, whichever way this returns.
        let process = self.process.insert(
            Command::new(&self.binary)
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting redis-server"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = process.try_wait() {
                self.process = None;
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server is not listening on {} after 10 s", self.port);
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    fn pttl(&self, key: &str) -> i64 {
        let mut redis = redis::Client::open(self.url()).and_then(|c| c.get_connection()).expect("connecting");
        redis::cmd("PTTL").arg(key).query(&mut redis).expect("PTTL")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn store(redis: &Redis) -> Store {
    Store::Redis(RedisStore::new(&redis.url(), Duration::from_secs(2)).expect("a Redis URL"))
}

fn gate(redis: &Redis) -> Gate {
    let budgets = Budgets::open(std::path::Path::new("/nonexistent"), Some(&redis.url()), Duration::from_secs(2));
    Gate::new(store(redis), Arc::new(budgets.expect("a Redis URL")))
}

const CHAT: &str = "/v1/chat/completions";

fn ask(owner: &str) -> GateRequest {
    GateRequest {
        request_id: "r".into(),
        owner: owner.into(),
        path: CHAT.into(),
        model: "m".into(),
        cache: Some(CacheAsk {
            ttl_secs: 300,
            mode: CacheMode::Deterministic,
            shared: false,
            lookup: true,
            store: true,
        }),
        body: json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}),
        ..GateRequest::default()
    }
}

fn answer() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    }))
    .unwrap()
}

fn ended(verdict: &GateVerdict) -> StoreRequest {
    let GateVerdict::Proceed { ticket: Some(ticket), .. } = verdict else { panic!("no ticket: {verdict:?}") };
    StoreRequest {
        request_id: "r".into(),
        ticket: ticket.clone(),
        complete: true,
        status: 200,
        content_type: "application/json".into(),
        stream: false,
        usage: None,
    }
}

fn store_errors(gate: &Gate) -> u64 {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(gate.collector());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let line = text.lines().find(|l| l.starts_with("modelgate_cache_store_errors_total ")).expect("the counter");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn entries_expire_by_redis_clock_and_a_claim_is_its_holders() {
    let Some(redis) = Redis::start() else { return };
    let store = store(&redis);
    store.put("cache:a", b"1", 300_000, 0).await.unwrap();
    assert_eq!(store.get("cache:a", 0).await.unwrap().as_deref(), Some(&b"1"[..]));
    assert!((1..=300_000).contains(&redis.pttl("modelgate:cache:a")));

    assert_eq!(store.claim("idem:i", b"Ca:d", 600_000, 0).await.unwrap(), None);
    assert_eq!(store.claim("idem:i", b"Cb:d", 600_000, 0).await.unwrap().as_deref(), Some(&b"Ca:d"[..]));
    assert!((1..=600_000).contains(&redis.pttl("modelgate:idem:i")));
    store.release("idem:i", b"Cb:", 0).await.unwrap();
    store.complete("idem:i", b"Cb:", b"Dnot yours", 60_000, 0).await.unwrap();
    assert_eq!(store.get("idem:i", 0).await.unwrap().as_deref(), Some(&b"Ca:d"[..]));
    store.complete("idem:i", b"Ca:", b"Dmine", 60_000, 0).await.unwrap();
    assert_eq!(store.get("idem:i", 0).await.unwrap().as_deref(), Some(&b"Dmine"[..]));
    assert!((1..=60_000).contains(&redis.pttl("modelgate:idem:i")));
    store.release("idem:i", b"Ca:", 0).await.unwrap();
    assert!(store.get("idem:i", 0).await.unwrap().is_some());
    store.claim("idem:j", b"Cc:d", 600_000, 0).await.unwrap();
    store.release("idem:j", b"Cc:", 0).await.unwrap();
    assert_eq!(store.get("idem:j", 0).await.unwrap(), None);
}

#[tokio::test]
async fn of_many_gateways_claiming_a_key_at_once_one_holds_it() {
    let Some(redis) = Redis::start() else { return };
    let gates: Vec<_> = (0..4).map(|_| Arc::new(gate(&redis))).collect();
    let ask = GateRequest {
        idempotency: Some(IdempotencyAsk { key: "once".into(), window_secs: 60 }),
        cache: None,
        ..ask("alice")
    };
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (gate, ask) = (Arc::clone(&gates[i % gates.len()]), ask.clone());
            tokio::spawn(async move { gate.decide(&ask, 0).await.unwrap().0 })
        })
        .collect();
    let mut proceeded = 0;
    for task in tasks {
        match task.await.unwrap() {
            GateVerdict::Proceed { .. } => proceeded += 1,
            GateVerdict::Refuse { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(proceeded, 1);
}

#[tokio::test]
async fn an_answer_kept_by_one_gateway_is_a_hit_on_another() {
    let Some(redis) = Redis::start() else { return };
    let (one, two) = (gate(&redis), gate(&redis));
    let (verdict, _) = one.decide(&ask("alice"), 0).await.unwrap();
    one.keep(&ended(&verdict), &answer(), 0).await;
    let (verdict, bytes) = two.decide(&ask("alice"), 0).await.unwrap();
    assert!(matches!(verdict, GateVerdict::Replay { source: ReplaySource::Cache, .. }), "{verdict:?}");
    let whole: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(whole["choices"][0]["message"]["content"], "hello");
    assert!(matches!(two.decide(&ask("bob"), 0).await.unwrap().0, GateVerdict::Proceed { .. }));
}

#[tokio::test]
async fn a_redis_gone_mid_run_is_a_miss_and_back_it_serves_again() {
    let Some(mut redis) = Redis::start() else { return };
    let gate = gate(&redis);
    let (verdict, _) = gate.decide(&ask("alice"), 0).await.unwrap();
    gate.keep(&ended(&verdict), &answer(), 0).await;
    assert!(matches!(gate.decide(&ask("alice"), 0).await.unwrap().0, GateVerdict::Replay { .. }));

    redis.kill();
    let idempotent =
        GateRequest { idempotency: Some(IdempotencyAsk { key: "k".into(), window_secs: 60 }), ..ask("alice") };
    let (verdict, _) = gate.decide(&idempotent, 0).await.unwrap();
    assert_eq!(verdict, GateVerdict::Proceed { member: 0, ticket: None, cache_miss: true });
    assert!(store_errors(&gate) >= 1);

    assert!(redis.spawn(), "redis-server exited at restart");
    // Reconnected within a second or so; until then each request is a miss.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (verdict, _) = gate.decide(&ask("alice"), 0).await.unwrap();
        if let GateVerdict::Proceed { ticket: Some(_), .. } = &verdict {
            gate.keep(&ended(&verdict), &answer(), 0).await;
            break;
        }
        assert!(Instant::now() < deadline, "Redis not used again after its restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(gate.decide(&ask("alice"), 0).await.unwrap().0, GateVerdict::Replay { .. }));
}
