use clap::Parser;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use modelgate_ext_proc::service::Processor;
use modelgate_ext_proc::stream_guard::StreamGuard;
use std::net::SocketAddr;

/// modelgate's ext_proc gRPC service for Envoy.
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
    /// Address the stream guard listens on; no guard runs if unset. Envoy's
    /// `stream_guard_cluster` points here.
    #[arg(long, env = "MODELGATE_STREAM_GUARD_LISTEN", requires = "stream_guard_upstream")]
    stream_guard_listen: Option<SocketAddr>,
    /// Envoy's inner listener, which the stream guard relays streams to.
    #[arg(long, env = "MODELGATE_STREAM_GUARD_UPSTREAM", requires = "stream_guard_listen")]
    stream_guard_upstream: Option<SocketAddr>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if args.worker_threads > 0 {
        runtime.worker_threads(args.worker_threads);
    }
    runtime.enable_all().build()?.block_on(serve(args))
}

async fn serve(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    if let (Some(listen), Some(upstream)) = (args.stream_guard_listen, args.stream_guard_upstream) {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        tracing::info!(%listen, %upstream, "stream guard listening");
        tokio::spawn(StreamGuard::new(upstream).serve(listener));
    }
    tracing::info!(listen = %args.listen, "modelgate ext-proc listening");
    tonic::transport::Server::builder()
        .add_service(ExternalProcessorServer::new(Processor))
        .serve_with_shutdown(args.listen, shutdown_signal())
        .await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
