//! Keeps every replica's state fresh: its metrics every `scrape_interval_ms`,
//! and its model list every `models_interval_ms` when discovery is on; and,
//! for a pool with `dns`, its set of replicas, looked up every `dns_refresh_ms`.
//!
//! A failed read changes nothing: the replica's last success ages until it
//! is stale, and then the picker passes it over. Failures are logged when a
//! replica starts and stops failing, not at every read. A failed lookup
//! likewise keeps the pool's last set.

use crate::config::Membership;
use crate::metrics;
use crate::pool::{Change, Pool, Replica};
use crate::Pools;
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

/// Looks a `host:port` name up.
pub trait Resolve: Send + Sync + 'static {
    fn resolve(&self, name: &str) -> impl Future<Output = io::Result<Vec<SocketAddr>>> + Send;
}

/// The system resolver (`getaddrinfo`, through tokio's `lookup_host`): the
/// hosts file, then DNS as `/etc/resolv.conf` says, as Kubernetes sets it up.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    async fn resolve(&self, name: &str) -> io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host(name).await?.collect())
    }
}

/// Runs until `stop` resolves.
pub async fn run(pools: Arc<Pools>, stop: impl Future<Output = ()>) {
    run_with(pools, Arc::new(SystemResolver), stop).await;
}

/// [`run`] on a thread and runtime of its own, until `stop` resolves: a
/// replica's read, its page parsed, never waits in line before an answer to
/// Envoy on the threads that serve requests (with one such thread, as beside
/// a small Envoy, a pick could wait behind 80 reads a second).
pub fn run_apart(pools: Arc<Pools>, stop: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("pool-scrape".to_owned()).spawn(move || runtime.block_on(run(pools, stop)))?;
    Ok(())
}

/// [`run`], looking names up with `resolver`.
pub async fn run_with<R: Resolve>(pools: Arc<Pools>, resolver: Arc<R>, stop: impl Future<Output = ()>) {
    let mut kept = JoinSet::new();
    for pool in pools.iter() {
        kept.spawn(keep_pool(Arc::clone(pool), Arc::clone(&resolver)));
    }
    stop.await;
    kept.abort_all();
}

/// Keeps one pool's replicas read, and its set current when it has `dns`, until aborted.
async fn keep_pool<R: Resolve>(pool: Arc<Pool>, resolver: Arc<R>) {
    let mut scrapers = Scrapers::default();
    let Ok(Membership::Dns { name, refresh_ms }) = pool.config().membership() else {
        scrapers.follow(&pool);
        return std::future::pending().await;
    };
    let mut ticks = tokio::time::interval(Duration::from_millis(refresh_ms));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    let mut ignored = 0;
    loop {
        ticks.tick().await;
        let answer = match resolver.resolve(name).await {
            // No address at all is also what a resolver's hiccup looks like; the
            // replicas that are really gone are passed over by their own failed reads.
            Ok(addresses) if addresses.is_empty() => Err("the name has no address".to_owned()),
            Ok(mut addresses) => {
                // Resolvers order addresses as they like; past the bound, which
                // new ones join should not depend on that.
                addresses.sort_unstable();
                Ok(addresses)
            }
            Err(e) => Err(e.to_string()),
        };
        match answer {
            Ok(addresses) => {
                if failing {
                    tracing::info!(pool = pool.name(), name, "the pool's name resolves again");
                    failing = false;
                }
                let change = pool.set_replicas(addresses.iter().map(SocketAddr::to_string));
                log_change(&pool, name, &change, &mut ignored);
            }
            Err(error) => {
                pool.lookup_failed();
                if !failing {
                    tracing::warn!(
                        pool = pool.name(),
                        name,
                        error,
                        "looking the pool's name up failed; its replicas stay as they were"
                    );
                    failing = true;
                }
            }
        }
        scrapers.follow(&pool);
    }
}

/// Logs replicas joining and leaving, and addresses left out when their number changes.
fn log_change(pool: &Pool, name: &str, change: &Change, ignored: &mut usize) {
    if !change.added.is_empty() || !change.removed.is_empty() {
        tracing::info!(pool = pool.name(), name, added = ?change.added, removed = ?change.removed, "the pool's replicas changed");
    }
    if change.ignored != *ignored && change.ignored > 0 {
        tracing::warn!(
            pool = pool.name(),
            name,
            ignored = change.ignored,
            most = crate::config::defaults::MAX_REPLICAS,
            "the name gives more addresses than a pool holds; the rest are ignored"
        );
    }
    *ignored = change.ignored;
}

/// The reading tasks of a pool's replicas, by replica id. Dropping a
/// replica's `JoinSet` aborts its tasks.
#[derive(Default)]
struct Scrapers(HashMap<u64, JoinSet<()>>);

impl Scrapers {
    /// Reads the pool's current replicas: starts reading those that joined,
    /// stops reading those that left.
    fn follow(&mut self, pool: &Arc<Pool>) {
        let replicas = pool.replicas();
        self.0.retain(|id, _| replicas.iter().any(|r| r.id() == *id));
        for replica in replicas.iter() {
            self.0.entry(replica.id()).or_insert_with(|| read_replica(pool, replica));
        }
    }
}

/// Starts reading one replica's metrics, and its models when discovery is on.
fn read_replica(pool: &Arc<Pool>, replica: &Arc<Replica>) -> JoinSet<()> {
    let mut loops = JoinSet::new();
    let config = pool.config();
    let metrics_url = format!("http://{}{}", replica.address, config.metrics_path);
    let every = Duration::from_millis(config.scrape_interval_ms);
    let (pool_, replica_) = (Arc::clone(pool), Arc::clone(replica));
    loops.spawn(keep_reading(pool_, replica_, metrics_url, every, read_metrics));
    if config.discover_models {
        let models_url = format!("http://{}/v1/models", replica.address);
        let every = Duration::from_millis(config.models_interval_ms);
        let (pool_, replica_) = (Arc::clone(pool), Arc::clone(replica));
        loops.spawn(keep_reading(pool_, replica_, models_url, every, read_models));
    }
    loops
}

/// What one read of a replica's page does with the page: `Err` is a failure.
type Apply = fn(&Replica, &[u8]) -> Result<(), String>;

/// Reads `url` every `every`, until aborted.
async fn keep_reading(pool: Arc<Pool>, replica: Arc<Replica>, url: String, every: Duration, apply: Apply) {
    // A read may take up to half the time its replica has before it counts as
    // stale: on a busy machine a slow read is not yet a failing replica, while a
    // hung one is still seen failing in time. Reads never overlap.
    let timeout = every.max(pool.stale_after() / 2);
    let client = match reqwest::Client::builder().timeout(timeout).build() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(pool = pool.name(), url, error = %e, "cannot build an HTTP client to read a replica");
            return;
        }
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing: Option<String> = None;
    loop {
        ticks.tick().await;
        let outcome = match client.get(&url).send().await {
            Ok(response) => match read(response).await {
                Ok(page) => apply(&replica, &page),
                Err(e) => Err(e),
            },
            Err(e) => {
                if e.is_connect() && !e.is_timeout() {
                    replica.update(|state| state.refused = true);
                }
                Err(e.to_string())
            }
        };
        match (outcome, &failing) {
            (Ok(()), Some(_)) => {
                tracing::info!(pool = pool.name(), url, "replica answers again");
                failing = None;
            }
            (Err(error), None) => {
                tracing::warn!(
                    pool = pool.name(),
                    url,
                    error,
                    "replica does not answer; it is not picked once its state is stale"
                );
                failing = Some(error);
            }
            _ => {}
        }
    }
}

async fn read(response: reqwest::Response) -> Result<Vec<u8>, String> {
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    Ok(response.bytes().await.map_err(|e| e.to_string())?.to_vec())
}

fn read_metrics(replica: &Replica, page: &[u8]) -> Result<(), String> {
    let metrics = metrics::parse(&String::from_utf8_lossy(page))?;
    let now = Instant::now();
    replica.update(|state| {
        state.metrics = Some(metrics);
        state.scraped_at = Some(now);
        state.refused = false;
    });
    Ok(())
}

/// `/v1/models` as OpenAI shapes it; only the ids matter here.
#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
}

fn read_models(replica: &Replica, page: &[u8]) -> Result<(), String> {
    let list: ModelList = serde_json::from_slice(page).map_err(|e| format!("unreadable model list: {e}"))?;
    let models: BTreeSet<String> = list.data.into_iter().map(|m| m.id).collect();
    replica.update(|state| state.models = Some(models));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::PickRequest;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const METRICS: &str =
        "vllm:num_requests_running{model_name=\"m\"} 2\nvllm:num_requests_waiting{model_name=\"m\"} 1\n";
    const MODELS: &str = r#"{"object":"list","data":[{"id":"m","object":"model"},{"id":"m-sql","object":"model"}]}"#;

    /// A replica that answers every request, `/v1/models` with MODELS and
    /// anything else with METRICS, until `hang` is set: then it reads
    /// requests and never answers.
    async fn serve(listener: TcpListener, hang: Arc<AtomicBool>) {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let hang = Arc::clone(&hang);
            tokio::spawn(async move {
                let mut request = vec![0u8; 4096];
                let Ok(n) = stream.read(&mut request).await else { return };
                if hang.load(Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
                let body = if request[..n].starts_with(b"GET /v1/models ") { MODELS } else { METRICS };
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
            });
        }
    }

    async fn until(what: &str, mut condition: impl FnMut() -> bool) {
        // Generous: the machine may be busy; this bounds a hang, it times nothing.
        for _ in 0..2000 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_that_stops_answering_becomes_not_ready() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(serve(listener, Arc::default()));
        let json = format!(
            r#"{{"pools":{{"p":{{"replicas":["{address}"],"scrape_interval_ms":20,"stale_after_ms":200,"discover_models":true,"models_interval_ms":20}}}}}}"#
        );
        let pools = Arc::new(Pools::from_json(json.as_bytes()).unwrap());
        let pool = Arc::clone(pools.get("p").unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let scraper = tokio::spawn(run(Arc::clone(&pools), async {
            let _ = stopped.await;
        }));
        let replica = Arc::clone(&pool.replicas()[0]);
        let stale_after = Duration::from_millis(200);

        until("ready", || replica.is_ready(Instant::now(), stale_after)).await;
        let state = replica.state();
        assert_eq!(state.metrics.map(|m| (m.running, m.waiting)), Some((2, 1)));
        until("models read", || replica.state().models.is_some()).await;
        assert_eq!(pool.models(), ["m", "m-sql"].map(String::from).into());

        server.abort();
        let _ = server.await;
        until("refused", || replica.state().refused).await;
        assert!(!replica.is_ready(Instant::now(), stale_after), "a replica refusing reads is not ready");
        let request = PickRequest { model: "m", ..Default::default() };
        assert_eq!(pool.pick(&request, Instant::now()).unwrap_err(), crate::pool::Refusal::NoneReady);

        stop.send(()).unwrap();
        scraper.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_that_hangs_goes_stale() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let hang = Arc::new(AtomicBool::new(false));
        let server = tokio::spawn(serve(listener, Arc::clone(&hang)));
        let json =
            format!(r#"{{"pools":{{"p":{{"replicas":["{address}"],"scrape_interval_ms":20,"stale_after_ms":200}}}}}}"#);
        let pools = Arc::new(Pools::from_json(json.as_bytes()).unwrap());
        let replica = Arc::clone(&pools.get("p").unwrap().replicas()[0]);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let scraper = tokio::spawn(run(Arc::clone(&pools), async {
            let _ = stopped.await;
        }));
        let stale_after = Duration::from_millis(200);

        until("ready", || replica.is_ready(Instant::now(), stale_after)).await;
        hang.store(true, Ordering::Relaxed);
        until("stale", || !replica.is_ready(Instant::now(), stale_after)).await;
        assert!(!replica.state().refused, "a replica that does not answer in time has not refused");
        hang.store(false, Ordering::Relaxed);
        until("ready again", || replica.is_ready(Instant::now(), stale_after)).await;

        stop.send(()).unwrap();
        scraper.await.unwrap();
        server.abort();
    }

    /// Answers each lookup with the next answer the test sends, waiting for it.
    struct Scripted(tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<io::Result<Vec<SocketAddr>>>>);

    impl Resolve for Scripted {
        async fn resolve(&self, _name: &str) -> io::Result<Vec<SocketAddr>> {
            match self.0.lock().await.recv().await {
                Some(answer) => answer,
                None => std::future::pending().await,
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dns_pool_follows_its_names_answers_and_keeps_its_set_when_a_lookup_fails() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live: SocketAddr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Arc::default()));
        // Nothing listens there once this listener is gone.
        let dead: SocketAddr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let json =
            r#"{"pools":{"p":{"dns":"vllm:8000","dns_refresh_ms":10,"scrape_interval_ms":20,"stale_after_ms":2000}}}"#;
        let pools = Arc::new(Pools::from_json(json.as_bytes()).unwrap());
        let pool = Arc::clone(pools.get("p").unwrap());
        let (answer, answers) = tokio::sync::mpsc::unbounded_channel();
        let resolver = Arc::new(Scripted(tokio::sync::Mutex::new(answers)));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let kept = tokio::spawn(run_with(Arc::clone(&pools), resolver, async {
            let _ = stopped.await;
        }));
        let addresses = |pool: &Pool| pool.replicas().iter().map(|r| r.address.clone()).collect::<BTreeSet<_>>();
        let stale_after = Duration::from_millis(2000);

        answer.send(Ok(vec![live, dead])).unwrap();
        until("both replicas", || addresses(&pool).len() == 2).await;
        let replica = Arc::clone(pool.replicas().iter().find(|r| r.address == live.to_string()).unwrap());
        until("the live one ready", || replica.is_ready(Instant::now(), stale_after)).await;
        let request = PickRequest { model: "m", ..Default::default() };
        assert_eq!(pool.pick(&request, Instant::now()).unwrap().primary(), live.to_string());

        answer.send(Err(io::Error::other("SERVFAIL"))).unwrap();
        until("a failure counted", || pool.lookup_failures() == 1).await;
        answer.send(Ok(Vec::new())).unwrap();
        until("an empty answer counted", || pool.lookup_failures() == 2).await;
        assert_eq!(addresses(&pool), [live, dead].map(|a| a.to_string()).into(), "the last set is kept");
        assert!(replica.is_ready(Instant::now(), stale_after), "and still read");

        answer.send(Ok(vec![dead])).unwrap();
        until("the live one gone", || addresses(&pool) == [dead.to_string()].into()).await;
        // The test's own reference is the last once its scrapers have stopped.
        until("its scrapers stopped", || Arc::strong_count(&replica) == 1).await;
        assert_eq!(pool.pick(&request, Instant::now()).unwrap_err(), crate::pool::Refusal::NoneReady);

        stop.send(()).unwrap();
        kept.await.unwrap();
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn localhost_resolves_through_the_system_resolver_to_a_replica_that_is_picked() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(serve(listener, Arc::default()));
        let json = format!(
            r#"{{"pools":{{"p":{{"dns":"localhost:{port}","dns_refresh_ms":50,"scrape_interval_ms":20,"stale_after_ms":2000}}}}}}"#
        );
        let pools = Arc::new(Pools::from_json(json.as_bytes()).unwrap());
        let pool = Arc::clone(pools.get("p").unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let kept = tokio::spawn(run(Arc::clone(&pools), async {
            let _ = stopped.await;
        }));
        let request = PickRequest { model: "m", ..Default::default() };
        until("picked", || pool.pick(&request, Instant::now()).is_ok()).await;
        assert_eq!(pool.pick(&request, Instant::now()).unwrap().primary(), format!("127.0.0.1:{port}"));
        // localhost may also be ::1, where nothing listens: a replica, never ready.
        assert!(pool.replicas().iter().all(|r| r.address.ends_with(&format!(":{port}"))));

        stop.send(()).unwrap();
        kept.await.unwrap();
        server.abort();
    }
}
