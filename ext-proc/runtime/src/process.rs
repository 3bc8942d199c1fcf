//! What ext-proc and the stream guard both do as processes: a tokio runtime of a
//! chosen size, logs to stderr, and a clean stop on SIGTERM or Ctrl-C: new work
//! is refused, and open work gets until a deadline to finish.

use modelgate_proto::framing::DEFAULT_MAX_EVENT_BYTES;
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;

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

/// A process's stop, shared by its servers: once it is asked for (SIGTERM or
/// Ctrl-C), the process first reports itself unready while it still serves
/// (for the drain delay), then each server refuses new work, and the work
/// open then gets until a deadline to finish before it is cut.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<Stage>);

/// How far a process's stop has come, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Serving,
    /// Signalled: still serving, but readiness probes fail, so load balancers stop sending.
    Unready,
    /// Servers refuse new work; open work drains.
    Stopping,
}

impl Shutdown {
    /// The stop SIGTERM or Ctrl-C asks for, `drain_delay` after the signal.
    /// The handlers are installed by the call itself, so a signal that arrives
    /// before anything waits for it still stops the servers cleanly (call it
    /// before binding).
    pub fn on_signal(drain_delay: Duration) -> Self {
        Self::after(signal(), drain_delay)
    }

    /// The stop `ask` asks for when it resolves.
    pub fn on(ask: impl Future<Output = ()> + Send + 'static) -> Self {
        Self::after(ask, Duration::ZERO)
    }

    /// The stop `ask` asks for, `drain_delay` after it resolves: unready meanwhile.
    pub fn after(ask: impl Future<Output = ()> + Send + 'static, drain_delay: Duration) -> Self {
        let (stage, watching) = watch::channel(Stage::Serving);
        tokio::spawn(async move {
            ask.await;
            if !drain_delay.is_zero() {
                tracing::info!(
                    delay_secs = drain_delay.as_secs_f64(),
                    "unready; still serving until the drain delay ends"
                );
                stage.send_replace(Stage::Unready);
                tokio::time::sleep(drain_delay).await;
            }
            stage.send_replace(Stage::Stopping);
        });
        Shutdown(watching)
    }

    /// A stop never asked for: the servers run until their task is dropped.
    pub fn never() -> Self {
        Shutdown(watch::channel(Stage::Serving).1)
    }

    /// True until the stop is asked for: what the readiness probe answers.
    pub fn ready(&self) -> bool {
        *self.0.borrow() == Stage::Serving
    }

    /// Resolves once the servers must refuse new work (the drain delay past).
    pub fn asked(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut asked = self.0.clone();
        async move {
            if asked.wait_for(|stage| *stage == Stage::Stopping).await.is_err() {
                // Nothing can ask any more.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Runs `serving` (servers that refuse new work once [`Shutdown::asked`]
    /// resolves, and end once their open work is done), and gives that work
    /// `deadline` after the stop is asked for: `None` when the deadline came first.
    pub async fn drain<T>(&self, serving: impl Future<Output = T>, deadline: Duration) -> Option<T> {
        let asked = self.asked();
        let past_deadline = async move {
            asked.await;
            tokio::time::sleep(deadline).await;
        };
        tokio::select! {
            served = serving => Some(served),
            () = past_deadline => None,
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C; the handlers are installed by the call itself.
fn signal() -> impl Future<Output = ()> {
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

/// The options ext-proc and the stream guard share, with the same names,
/// variables and defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct ProcessArgs {
    /// Seconds open work (streams, gRPC exchanges, admin requests) gets to
    /// finish after SIGTERM, while new connections are refused; then it is
    /// cut, a stream ending with an OpenAI error event.
    #[arg(long, env = "MODELGATE_SHUTDOWN_DEADLINE_SECS", default_value_t = DEFAULT_SHUTDOWN_DEADLINE_SECS)]
    pub shutdown_deadline_secs: u64,
    /// Seconds between SIGTERM and the drain during which everything is still
    /// served but `GET /readyz` answers 503, so that load balancers (Kubernetes
    /// endpoints, Envoy's health checks) stop sending new work before the
    /// listeners close. The signal's sender waits this plus the deadline.
    #[arg(long, env = "MODELGATE_DRAIN_DELAY_SECS", default_value_t = 0)]
    pub drain_delay_secs: u64,
    /// The most of one unfinished event (or NDJSON line) a stream holds while
    /// it waits for the event's end; an event that outgrows it ends the stream
    /// with an OpenAI error event.
    #[arg(long, env = "MODELGATE_MAX_EVENT_BYTES", default_value_t = DEFAULT_MAX_EVENT_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_event_bytes: u64,
}

impl ProcessArgs {
    pub fn shutdown_deadline(&self) -> Duration {
        Duration::from_secs(self.shutdown_deadline_secs)
    }

    pub fn drain_delay(&self) -> Duration {
        Duration::from_secs(self.drain_delay_secs)
    }

    /// `--max-event-bytes`, which must fit this machine's memory addresses.
    pub fn max_event_bytes(&self) -> Result<usize, std::num::TryFromIntError> {
        usize::try_from(self.max_event_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_open_at_the_stop_gets_until_the_deadline() {
        let (ask, asked) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::on(async move {
            let _ = asked.await;
        });
        let finishing = {
            let asked = shutdown.asked();
            async move {
                asked.await;
                tokio::time::sleep(Duration::from_millis(10)).await;
                "done"
            }
        };
        ask.send(()).unwrap();
        assert_eq!(shutdown.drain(finishing, Duration::from_secs(30)).await, Some("done"));

        let never_done = std::future::pending::<()>();
        assert_eq!(shutdown.drain(never_done, Duration::from_millis(10)).await, None);
    }

    #[tokio::test]
    async fn a_stop_never_asked_for_never_cuts() {
        let served = Shutdown::never().drain(async { "served" }, Duration::ZERO).await;
        assert_eq!(served, Some("served"));
        let waiting = tokio::time::timeout(Duration::from_millis(20), Shutdown::never().asked()).await;
        assert!(waiting.is_err());
    }
}
