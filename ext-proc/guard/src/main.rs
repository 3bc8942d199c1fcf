use clap::Parser;
use modelgate_dialects::credentials::KeySourceArgs;
use modelgate_runtime::internal_token::InternalTokenArgs;
use modelgate_runtime::process::{run, ProcessArgs, Shutdown};
use modelgate_stream_guard::server::{StreamGuard, DEFAULT_MAX_HEADERS};
use modelgate_stream_guard::upstream::Upstream;
use std::net::SocketAddr;

/// modelgate's stream guard: relays streaming requests to Envoy's inner
/// listener and ends a stream the backend breaks off with an OpenAI error event.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address the guard listens on; the filter's `stream_guard_cluster` points here.
    #[arg(long, env = "MODELGATE_STREAM_GUARD_LISTEN", default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
    /// Envoy's inner listener, which routes the relayed streams: `ip:port`, or
    /// `host:port` resolved for each new connection (a Service, in Kubernetes).
    #[arg(long, env = "MODELGATE_STREAM_GUARD_UPSTREAM", default_value = "127.0.0.1:10001")]
    upstream: Upstream,
    /// Threads serving streams; 0 means one per CPU.
    #[arg(long, env = "MODELGATE_STREAM_GUARD_THREADS", default_value_t = 0)]
    worker_threads: usize,
    #[command(flatten)]
    keys: KeySourceArgs,
    #[command(flatten)]
    token: InternalTokenArgs,
    /// Most headers a relayed request or answer may have: keep it above Envoy's
    /// `max_headers_count` on the OpenAI listener, and the inner listener's at least as high.
    #[arg(long, env = "MODELGATE_STREAM_GUARD_MAX_HEADERS", default_value_t = DEFAULT_MAX_HEADERS)]
    max_headers: usize,
    #[command(flatten)]
    process: ProcessArgs,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let max_event_bytes = args.process.max_event_bytes()?;
    run(args.worker_threads, async move {
        let keys = args.keys.sources()?;
        let token = args.token.load("the stream guard's port")?;
        // Installed before the guard listens: a SIGTERM from then on drains it.
        let shutdown = Shutdown::on_signal(args.process.drain_delay());
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        tracing::info!(listen = %args.listen, upstream = %args.upstream, "modelgate stream guard listening");
        let guard = StreamGuard::new(args.upstream)
            .with_keys(keys)
            .with_token(token)
            .with_max_headers(args.max_headers)
            .with_max_event_bytes(max_event_bytes);
        guard.serve_until(listener, shutdown, args.process.shutdown_deadline()).await;
        Ok(())
    })
}
