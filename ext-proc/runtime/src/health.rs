//! The probes Kubernetes (or any supervisor) asks of ext-proc's admin port and
//! the stream guard's port: open to every caller, since they reveal nothing.

use crate::process::Shutdown;

/// Liveness: answered while the process serves.
pub const LIVE: &str = "/healthz";
/// Readiness: 503 from SIGTERM on, while the drain delay still serves.
pub const READY: &str = "/readyz";

/// A probe's answer: its status and JSON body.
pub type Answer = (u16, &'static str);

/// The liveness probe's answer: given at all, the process serves.
pub fn live() -> Answer {
    (200, r#"{"status":"alive"}"#)
}

/// The readiness probe's answer.
pub fn readiness(shutdown: &Shutdown) -> Answer {
    if shutdown.ready() {
        (200, r#"{"status":"ready"}"#)
    } else {
        (503, r#"{"status":"draining"}"#)
    }
}

/// The answer to a probe of `path`, or `None` for any other path.
pub fn probe(path: &str, shutdown: &Shutdown) -> Option<Answer> {
    match path {
        LIVE => Some(live()),
        READY => Some(readiness(shutdown)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn readiness_fails_from_the_signal_on_while_liveness_holds() {
        let (ask, asked) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::after(
            async move {
                let _ = asked.await;
            },
            Duration::from_secs(3600),
        );
        assert_eq!(probe(READY, &shutdown), Some((200, r#"{"status":"ready"}"#)));
        ask.send(()).unwrap();
        while shutdown.ready() {
            tokio::task::yield_now().await;
        }
        assert_eq!(probe(READY, &shutdown), Some((503, r#"{"status":"draining"}"#)));
        assert_eq!(probe(LIVE, &shutdown), Some((200, r#"{"status":"alive"}"#)));
        assert_eq!(probe("/readyz/", &shutdown), None);
        // Still within the drain delay: the servers keep taking work.
        let asked = tokio::time::timeout(Duration::from_millis(20), shutdown.asked()).await;
        assert!(asked.is_err(), "servers stopped before the drain delay ended");
    }
}
