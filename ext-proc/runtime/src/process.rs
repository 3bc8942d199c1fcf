//! What both of this crate's servers do as processes: a tokio runtime of a
//! chosen size, logs to stderr, and a clean stop on SIGTERM or Ctrl-C: new work
//! is refused, and open work gets until a deadline to finish.

use std::future::Future;

/// Runs `serve` on a runtime with `worker_threads` threads (0: one per CPU),
/// with logging set up from `RUST_LOG` (default `info`).
pub fn run<F>(worker_threads: usize, serve: F) -> Result<(), Box<dyn std::error::Error>>
where
    F: Future<Output = Result<(), Box<dyn std::error::Error>>>,
{
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        runtime.worker_threads(worker_threads);
    }
    tracing_subscriber::fmt()
        // Colours only for a person at a terminal: log files and collectors get plain fields.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    runtime.enable_all().build()?.block_on(serve)
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed by the call
/// itself, so a signal that arrives before the future is first polled still
/// stops the server cleanly (call it before binding).
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    }
}

/// Seconds open streams and exchanges get to finish after the signal; the
/// default of both servers' `--shutdown-deadline-secs`.
pub const DEFAULT_SHUTDOWN_DEADLINE_SECS: u64 = 30;
