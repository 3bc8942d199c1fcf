//! Budgets in both stores, as the gate and the admin port use them: SQLite
//! in a temporary directory, and a real `redis-server` on a free loopback
//! port (skipped only when it is not installed, and failing then in CI).

use modelgate_gate::budgets::{Admission, BudgetReport, Budgets};
use modelgate_proto::budgets::{BudgetLimit, BudgetUnit, Period};
use modelgate_proto::gate::BudgetCandidate;
use serde_json::{json, Value};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// 2026-12-02T00:00:00Z.
const DAY: u64 = 1_796_169_600;
const NOW: u64 = DAY + 3600;
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// One store, and how to open another client on it (a reopened file, another
/// gateway's connection): what one wrote, the next must read.
struct Backend {
    name: &'static str,
    open: Box<dyn Fn() -> Budgets>,
    _storage: Box<dyn std::any::Any>,
}

impl Backend {
    fn open(&self) -> Budgets {
        (self.open)()
    }

    fn sqlite() -> Backend {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("data");
        Backend {
            name: "sqlite",
            open: Box::new(move || Budgets::open(&path, None, REDIS_TIMEOUT).expect("opening SQLite")),
            _storage: Box::new(dir),
        }
    }

    fn redis() -> Option<Backend> {
        let redis = Redis::start()?;
        let url = redis.url();
        Some(Backend {
            name: "redis",
            open: Box::new(move || {
                Budgets::open(&PathBuf::from("/nonexistent"), Some(&url), REDIS_TIMEOUT).expect("opening Redis")
            }),
            _storage: Box::new(redis),
        })
    }

    fn all() -> Vec<Backend> {
        [Some(Backend::sqlite()), Backend::redis()].into_iter().flatten().collect()
    }
}

fn budget(scope: &str, unit: BudgetUnit, period: Period, limit: u64) -> BudgetLimit {
    BudgetLimit { scope: scope.into(), unit, period, limit }
}

fn candidate(backend: &str, budgets: Vec<BudgetLimit>, usd_micros: u64, tokens: u64) -> BudgetCandidate {
    BudgetCandidate { backend: backend.into(), budgets, usd_micros, tokens }
}

/// Alice's 1000 tokens a day, on one backend; the request reserves `tokens`.
fn tokens_a_day(tokens: u64) -> Vec<BudgetCandidate> {
    vec![candidate("b", vec![budget("key", BudgetUnit::Tokens, Period::Day, 1000)], 0, tokens)]
}

async fn report(budgets: &Budgets, key: Option<&str>, now: u64) -> Value {
    let report: BudgetReport = budgets.report(key, now).await.expect("the report");
    serde_json::to_value(report).unwrap()
}

/// (limit, spent, reserved) of the report's only row.
async fn amounts(budgets: &Budgets, now: u64) -> (Value, Value, Value) {
    let report = report(budgets, None, now).await;
    let rows = report["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{report}");
    (rows[0]["limit"].clone(), rows[0]["spent"].clone(), rows[0]["reserved"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admissions_never_reserve_past_a_limit() {
    for backend in Backend::all() {
        // Two gateways on one store, each admitting many requests at once.
        let gateways = [Arc::new(backend.open()), Arc::new(backend.open())];
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let budgets = Arc::clone(&gateways[i % 2]);
                tokio::spawn(
                    async move { budgets.admit("alice", &tokens_a_day(70), false, &format!("r{i}"), NOW).await },
                )
            })
            .collect();
        let mut admitted = 0;
        for task in tasks {
            match task.await.unwrap().expect("an answer") {
                Admission::Admitted { member: 0 } => admitted += 1,
                Admission::Refused { budget, .. } => assert_eq!(budget, "tokens_per_day of key `alice`"),
                other => panic!("{other:?}"),
            }
        }
        // 14 × 70 = 980 ≤ 1000 < 15 × 70.
        assert_eq!(admitted, 14, "{}", backend.name);
        assert_eq!(amounts(&gateways[0], NOW).await, (json!(1000), json!(0), json!(980)), "{}", backend.name);
    }
}

#[tokio::test]
async fn a_reservation_settles_once_with_what_was_used() {
    for backend in Backend::all() {
        let budgets = backend.open();
        let admitted = budgets.admit("alice", &tokens_a_day(600), false, "r1", NOW).await.unwrap();
        assert_eq!(admitted, Admission::Admitted { member: 0 });
        // The same reservation asked again is answered alike, and not reserved twice.
        assert_eq!(budgets.admit("alice", &tokens_a_day(600), false, "r1", NOW).await.unwrap(), admitted);
        assert_eq!(amounts(&budgets, NOW).await, (json!(1000), json!(0), json!(600)), "{}", backend.name);
        // Too much while reserved.
        let refused = budgets.admit("alice", &tokens_a_day(600), false, "r2", NOW).await.unwrap();
        assert!(matches!(refused, Admission::Refused { .. }), "{}", backend.name);
        budgets.settle("r1", 999_999, 150).await.unwrap();
        budgets.settle("r1", 999_999, 150).await.unwrap();
        budgets.settle("never-made", 1, 1).await.unwrap();
        assert_eq!(amounts(&budgets, NOW).await, (json!(1000), json!(150), json!(0)), "{}", backend.name);
        // What the first left is there for the next.
        assert_eq!(
            budgets.admit("alice", &tokens_a_day(600), false, "r3", NOW).await.unwrap(),
            Admission::Admitted { member: 0 }
        );
        // Its usage unknown, a request is charged what it reserved.
        budgets.settle_as_reserved("r3").await.unwrap();
        assert_eq!(amounts(&budgets, NOW).await, (json!(1000), json!(750), json!(0)), "{}", backend.name);
        // An admission landing after its request was settled (its answer lost) reserves nothing.
        budgets.settle("lost", 0, 0).await.unwrap();
        assert_eq!(
            budgets.admit("alice", &tokens_a_day(100), false, "lost", NOW).await.unwrap(),
            Admission::Admitted { member: 0 }
        );
        assert_eq!(amounts(&budgets, NOW).await, (json!(1000), json!(750), json!(0)), "{}", backend.name);
    }
}

#[tokio::test]
async fn a_spent_budget_refuses_until_its_period_ends() {
    for backend in Backend::all() {
        let budgets = backend.open();
        let last_second = DAY + 86_399;
        let usd = vec![candidate(
            "b",
            vec![
                budget("key", BudgetUnit::Usd, Period::Month, 100_000_000),
                budget("model:gpt-4*", BudgetUnit::Usd, Period::Day, 1_000_000),
            ],
            400_000,
            10,
        )];
        for id in ["a", "b"] {
            assert_eq!(
                budgets.admit("alice", &usd, false, id, last_second).await.unwrap(),
                Admission::Admitted { member: 0 }
            );
            budgets.settle(id, 450_000, 10).await.unwrap();
        }
        // 0.90 spent of 1.00: 0.40 more does not fit.
        let refused = budgets.admit("alice", &usd, false, "c", last_second).await.unwrap();
        assert_eq!(
            refused,
            Admission::Refused {
                budget: "usd_per_day of key `alice` on models `gpt-4*`".into(),
                resets_at: DAY + 86_400
            },
            "{}",
            backend.name
        );
        let next_day = DAY + 86_400;
        assert_eq!(
            budgets.admit("alice", &usd, false, "c", next_day).await.unwrap(),
            Admission::Admitted { member: 0 }
        );
        let rows = report(&budgets, Some("alice"), next_day).await;
        assert_eq!(
            rows,
            json!({"object": "list", "data": [
                {"key": "alice", "scope": "key", "amount": "usd_per_month", "period": "2026-12",
                 "limit": 100.0, "spent": 0.9, "reserved": 0.4, "resets_at": 1_798_761_600u64},
                {"key": "alice", "scope": "model:gpt-4*", "amount": "usd_per_day", "period": "2026-12-03",
                 "limit": 1.0, "spent": 0.0, "reserved": 0.4, "resets_at": next_day + 86_400},
            ]}),
            "{}",
            backend.name
        );
        // Another key's budgets are its own.
        assert_eq!(report(&budgets, Some("bob"), next_day).await["data"], json!([]));
        budgets.settle("c", 100_000, 10).await.unwrap();
        let rows = report(&budgets, None, next_day).await;
        assert_eq!(
            (&rows["data"][0]["spent"], &rows["data"][1]["spent"]),
            (&json!(1.0), &json!(0.1)),
            "{}",
            backend.name
        );
    }
}

#[tokio::test]
async fn a_spent_backend_falls_back_to_the_next_when_allowed() {
    for backend in Backend::all() {
        let budgets = backend.open();
        let chain = vec![
            candidate("openai", vec![budget("backend:openai", BudgetUnit::Usd, Period::Day, 1000)], 2000, 10),
            candidate("azure", vec![budget("backend:azure", BudgetUnit::Usd, Period::Day, 5000)], 3000, 10),
        ];
        let refused = budgets.admit("alice", &chain, false, "a", NOW).await.unwrap();
        assert_eq!(
            refused,
            Admission::Refused {
                budget: "usd_per_day of key `alice` on backend `openai`".into(),
                resets_at: DAY + 86_400
            }
        );
        assert_eq!(budgets.admit("alice", &chain, true, "b", NOW).await.unwrap(), Admission::Admitted { member: 1 });
        // Both spent: the first candidate's budget is named.
        let refused = budgets.admit("alice", &chain, true, "c", NOW).await.unwrap();
        assert!(matches!(&refused, Admission::Refused { budget, .. } if budget.contains("openai")), "{refused:?}");
        budgets.settle("b", 1000, 10).await.unwrap();
        let rows = report(&budgets, None, NOW).await;
        let azure =
            rows["data"].as_array().unwrap().iter().find(|row| row["scope"] == "backend:azure").unwrap().clone();
        assert_eq!((&azure["spent"], &azure["reserved"]), (&json!(0.001), &json!(0.0)), "{}", backend.name);
        assert_eq!(budgets.admit("alice", &[], false, "d", NOW).await.unwrap(), Admission::Admitted { member: 0 });
    }
}

#[tokio::test]
async fn reservations_and_spending_survive_a_reopened_file() {
    let backend = Backend::sqlite();
    {
        let budgets = backend.open();
        budgets.admit("alice", &tokens_a_day(300), false, "kept", NOW).await.unwrap();
        budgets.admit("alice", &tokens_a_day(200), false, "settled", NOW).await.unwrap();
        budgets.settle("settled", 0, 120).await.unwrap();
    }
    let budgets = backend.open();
    assert_eq!(amounts(&budgets, NOW).await, (json!(1000), json!(120), json!(300)));
    budgets.settle("settled", 0, 120).await.unwrap();
    budgets.settle("kept", 0, 280).await.unwrap();
    assert_eq!(amounts(&budgets, NOW).await, (json!(1000), json!(400), json!(0)));
}

#[tokio::test]
async fn a_stopped_redis_is_an_error_not_an_answer() {
    let Some(backend) = Backend::redis() else {
        return;
    };
    let redis: &Redis = backend._storage.downcast_ref().unwrap();
    let budgets = backend.open();
    budgets.admit("alice", &tokens_a_day(100), false, "r", NOW).await.unwrap();
    redis.pause();
    assert!(budgets.admit("alice", &tokens_a_day(100), false, "s", NOW).await.is_err());
    assert!(budgets.settle("r", 0, 100).await.is_err());
    assert!(budgets.report(None, NOW).await.is_err());
    redis.resume();
    // The calls that timed out may land still: settling is once all the same,
    // and the refused request's record releases what its admission reserved.
    budgets.settle("r", 0, 100).await.unwrap();
    budgets.settle("s", 0, 0).await.unwrap();
    assert_eq!(amounts(&budgets, NOW).await, (json!(1000), json!(100), json!(0)));
}

#[tokio::test]
async fn refusals_are_counted_per_key() {
    let backend = Backend::sqlite();
    let budgets = backend.open();
    for id in ["a", "b"] {
        budgets.admit("alice", &tokens_a_day(5000), false, id, NOW).await.unwrap();
    }
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(budgets.metrics());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains("modelgate_budget_refusals_total{key=\"alice\"} 2\n"), "{text}");
}

/// `redis-server` on the PATH, or why the test skips. CI installs it, so
/// there a missing one fails the test instead.
fn redis_server() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join("redis-server")).find(|p| p.is_file()));
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "redis-server is not on the PATH, and .ci/run installs it");
        eprintln!(
            "SKIPPED: redis-server is not on the PATH (Debian: apt-get install redis-server; .ci/run installs it)"
        );
    }
    found
}

/// A throwaway Redis without persistence; killed on drop.
struct Redis {
    port: u16,
    process: Child,
}

impl Redis {
    /// None when the test skips (no `redis-server`). Another process may take
    /// the port between choosing and binding it: a few tries.
    fn start() -> Option<Redis> {
        let binary = redis_server()?;
        Some((0..5).find_map(|_| Redis::spawn(&binary)).expect("redis-server exited at start five times"))
    }

    fn spawn(binary: &PathBuf) -> Option<Redis> {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let process = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        // Killed and waited for on drop, whichever way this returns.
        let mut redis = Redis { port, process };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = redis.process.try_wait() {
                return None;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(redis);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server is not listening on {port} after 10 s");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops it answering, connections kept open: a Redis that hangs.
    fn pause(&self) {
        self.signal("-STOP");
    }

    fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.process.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill {signal} redis-server");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}
