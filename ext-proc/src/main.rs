use clap::Parser;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use modelgate_ext_proc::process::{run, shutdown_signal};
use modelgate_ext_proc::service::Processor;
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
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    run(args.worker_threads, async move {
        tracing::info!(listen = %args.listen, "modelgate ext-proc listening");
        tonic::transport::Server::builder()
            .add_service(ExternalProcessorServer::new(Processor))
            .serve_with_shutdown(args.listen, shutdown_signal())
            .await?;
        Ok(())
    })
}
