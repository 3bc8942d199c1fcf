use clap::Parser;
use modelgate_admin::routes::{self, Admin};
use modelgate_admin::shared_limits::SharedLimits;
use modelgate_admin::usage_report::Retention;
use modelgate_admin::usage_store::{Dedup, Ledger, RedisUsage, Usage};
use modelgate_batch::args::BatchArgs;
use modelgate_batch::Batches;
use modelgate_dialects::credentials::KeySourceArgs;
use modelgate_ext_proc::pool_metrics::PoolMetrics;
use modelgate_ext_proc::service::{self, PoolPicker, Processor, DEFAULT_MAX_MESSAGE_BYTES};
use modelgate_gate::budgets::Budgets;
use modelgate_gate::cache::{Memory, RedisStore, Store};
use modelgate_gate::gate::Gate;
use modelgate_pools::Pools;
use modelgate_proto::clock;
use modelgate_runtime::internal_token::{InternalToken, InternalTokenArgs};
use modelgate_runtime::process::{run, ProcessArgs, Shutdown};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// modelgate's ext_proc gRPC service for Envoy, and its admin port.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address the gRPC server listens on.
    #[arg(long, env = "MODELGATE_EXT_PROC_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Threads serving requests; 0 means one per CPU. Beside an Envoy on a
    /// small machine, 1 costs the least CPU per request.
    #[arg(long, env = "MODELGATE_EXT_PROC_THREADS", default_value_t = 0)]
    worker_threads: usize,
    /// Address of the admin port (plain HTTP): usage records in, metrics and
    /// usage reports out, shared rate limits.
    #[arg(long, env = "MODELGATE_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    admin_listen: SocketAddr,
    /// Hours of usage the report keeps, in minutes' sums.
    #[arg(long, env = "MODELGATE_USAGE_RETENTION_HOURS", default_value_t = 168,
          value_parser = clap::value_parser!(u64).range(1..))]
    usage_retention_hours: u64,
    /// Minutes a usage batch's id is remembered, so the same batch sent
    /// again within them (after a lost answer) is counted once.
    #[arg(long, env = "MODELGATE_USAGE_DEDUP_MINUTES", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    usage_dedup_minutes: u64,
    /// Directory of ext-proc's own state: the usage report's log and
    /// snapshot (under `usage/`), unless Redis keeps them. One ext-proc per directory.
    #[arg(long, env = "MODELGATE_DATA_DIR", default_value = "modelgate-data")]
    data_dir: PathBuf,
    /// Redis keeping rate-limit buckets and the usage report shared by several
    /// gateways, such as `redis://127.0.0.1:6379/0`; without it the admin port
    /// has no `/v1/limits/spend` and keeps usage under `--data-dir`.
    #[arg(long, env = "MODELGATE_REDIS_URL")]
    redis_url: Option<String>,
    /// Longest wait for Redis in one call, in milliseconds; past it the call is answered 503.
    #[arg(long, env = "MODELGATE_REDIS_TIMEOUT_MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..))]
    redis_timeout_ms: u64,
    /// Bytes the response cache and idempotent requests' answers may take in
    /// memory, the least recently used going first; ignored with `--redis-url`,
    /// which keeps them in Redis.
    #[arg(long, env = "MODELGATE_CACHE_MAX_BYTES", default_value_t = 268_435_456,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    cache_max_bytes: usize,
    #[command(flatten)]
    keys: KeySourceArgs,
    #[command(flatten)]
    token: InternalTokenArgs,
    /// Largest ext_proc message taken or sent, in bytes: keep it above the filter's
    /// `max_request_body_bytes` and twice Envoy's `per_connection_buffer_limit_bytes`
    /// (the largest whole answer to translate). A larger one fails its request (a 503).
    #[arg(long, env = "MODELGATE_EXT_PROC_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_message_bytes: usize,
    #[command(flatten)]
    batch: BatchArgs,
    /// Self-hosted pools whose replica ext-proc picks for each request (JSON;
    /// see docs/pools.md). A backend names its pool with `pool` in the filter's configuration.
    #[arg(long, env = "MODELGATE_POOLS")]
    pools: Option<PathBuf>,
    /// Address of the endpoint-picker protocol's gRPC service (the Gateway API
    /// Inference Extension's, for an InferencePool), with gRPC health checks;
    /// unset, none is served. It takes no internal token: see docs/deployment.md.
    #[arg(long, env = "MODELGATE_EPP_LISTEN", requires = "epp_pool")]
    epp_listen: Option<SocketAddr>,
    /// The pool of `--pools` whose replicas the endpoint-picker service picks.
    #[arg(long, env = "MODELGATE_EPP_POOL", requires = "epp_listen")]
    epp_pool: Option<String>,
    #[command(flatten)]
    process: ProcessArgs,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let max_event_bytes = args.process.max_event_bytes()?;
    run(args.worker_threads, async move {
        let keys = Arc::new(args.keys.sources()?);
        // Read once: the runner presents the same token the ports check.
        let secret = args.token.secret()?;
        let token = InternalToken::from_secret(secret.as_deref(), "ext-proc's gRPC and admin ports");
        // One stop for both servers; its signal handlers are installed before either listens.
        let shutdown = Shutdown::on_signal(args.process.drain_delay());

        let redis_timeout = Duration::from_millis(args.redis_timeout_ms);
        let limits = match &args.redis_url {
            Some(url) => Some(SharedLimits::new(url, redis_timeout)?),
            None => None,
        };
        let retention = Retention::hours(args.usage_retention_hours);
        let dedup = Dedup { window_ms: args.usage_dedup_minutes.saturating_mul(60_000) };
        let usage = match &args.redis_url {
            Some(url) => Usage::Redis(RedisUsage::new(url, redis_timeout, retention, dedup)?),
            None => {
                let dir = args.data_dir.join("usage");
                let ledger = Ledger::open(&dir, retention, dedup, clock::unix_millis())
                    .map_err(|e| format!("opening the usage store in {}: {e}", dir.display()))?;
                Usage::local(ledger)
            }
        };
        let pools = Arc::new(match &args.pools {
            Some(path) => Pools::from_file(path)?,
            None => Pools::default(),
        });
        let endpoint_picker = match (args.epp_listen, &args.epp_pool) {
            (Some(listen), Some(name)) => {
                let pool = pools.get(name).ok_or_else(|| format!("--epp-pool `{name}` is not a pool of --pools"))?;
                Some((listen, Arc::clone(pool)))
            }
            _ => None,
        };
        let batches = Batches::open(&args.batch, &args.data_dir, args.redis_url.as_deref(), secret, token.clone())?;
        let responses = Arc::new(batches.responses());
        let cache = match &args.redis_url {
            Some(url) => Store::Redis(RedisStore::new(url, redis_timeout)?),
            None => Store::Memory(Memory::new(args.cache_max_bytes)),
        };
        let budgets = Arc::new(
            Budgets::open(&args.data_dir, args.redis_url.as_deref(), redis_timeout)
                .map_err(|e| format!("opening the budgets' store: {e}"))?,
        );
        let gate = Arc::new(Gate::new(cache, Arc::clone(&budgets)));
        let admin = Admin::with_usage(usage)
            .with_collector(Box::new(PoolMetrics(Arc::clone(&pools))))
            .with_collector(gate.collector())
            .with_budgets(budgets);
        let admin = routes::router(Arc::new(admin), limits, token.clone())
            .merge(modelgate_gate::api::router(gate, token.clone()))
            .merge(batches.api())
            .merge(modelgate_pools::api::router(Arc::clone(&pools), token.clone()))
            .merge(routes::probes(shutdown.clone()));
        let admin_listener = tokio::net::TcpListener::bind(args.admin_listen).await?;
        // Stops with the process: a read cut short loses nothing.
        modelgate_pools::scrape::run_apart(Arc::clone(&pools), shutdown.asked())?;

        tracing::info!(listen = %args.listen, admin = %args.admin_listen, "modelgate ext-proc listening");
        let grpc = async {
            tonic::transport::Server::builder()
                .add_service(service::server(
                    Processor { keys, max_event_bytes, pools: Arc::clone(&pools), responses },
                    token,
                    args.max_message_bytes,
                ))
                .serve_with_shutdown(args.listen, shutdown.asked())
                .await
                .map_err(Box::<dyn std::error::Error>::from)
        };
        let admin = async {
            axum::serve(admin_listener, admin)
                .with_graceful_shutdown(shutdown.asked())
                .await
                .map_err(Box::<dyn std::error::Error>::from)
        };
        let endpoint_picker = async {
            let Some((listen, pool)) = endpoint_picker else { return Ok(()) };
            tracing::info!(listen = %listen, pool = pool.name(), "endpoint picker listening");
            let (reporter, health) = tonic_health::server::health_reporter();
            let picker =
                service::endpoint_picker_server(PoolPicker { pool: Arc::clone(&pool) }, args.max_message_bytes);
            let serve = tonic::transport::Server::builder()
                .add_service(health)
                .add_service(picker)
                .serve_with_shutdown(listen, shutdown.asked());
            let (served, ()) = tokio::join!(serve, service::report_health(reporter, pool, shutdown.clone()));
            served.map_err(Box::<dyn std::error::Error>::from)
        };
        let runner = batches.runner()?;
        let runner = async {
            runner.run(shutdown.asked()).await;
            Ok(())
        };
        let deadline = args.process.shutdown_deadline();
        match shutdown.drain(async { tokio::try_join!(grpc, admin, runner, endpoint_picker) }, deadline).await {
            Some(served) => {
                served?;
            }
            // Envoy answers the requests of the exchanges cut as ext_proc failures.
            None => tracing::warn!("exchanges still open at the shutdown deadline are cut"),
        }
        Ok(())
    })
}
