//! A thread of the lowest priority for the usage records' work. On a core
//! shared with Envoy and with the thread that answers Envoy's ext_proc
//! exchanges, Linux's scheduler lets either preempt it at once, where a
//! thread of normal priority (a blocking task's) takes turns with them of a
//! few milliseconds, and a pool's pick waits that long. Nice 19, not
//! `SCHED_IDLE`: on a saturated core it still gets its share, so records are
//! never starved.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

pub struct LowPriority {
    jobs: mpsc::Sender<Job>,
}

impl LowPriority {
    /// Starts the thread; it ends when this is dropped.
    pub fn start() -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let started = std::thread::Builder::new().name("usage-records".into()).spawn(move || {
            lower_own_priority();
            for job in queue {
                // A job that panics loses only its own answer.
                let _ = catch_unwind(AssertUnwindSafe(job));
            }
        });
        if let Err(e) = started {
            tracing::warn!(error = %e, "usage records: no thread of low priority, their work runs inline");
        }
        LowPriority { jobs }
    }

    /// `work`'s result, computed on the thread (inline where it could not start);
    /// `None` if `work` panicked.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(work());
        });
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            let _ = catch_unwind(AssertUnwindSafe(job));
        }
        result.await.ok()
    }
}

#[cfg(target_os = "linux")]
fn lower_own_priority() {
    // A Linux thread's nice value is its own: set on its thread id, not the process's.
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
        tracing::warn!(error = %e, "usage records: their thread's priority could not be lowered");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_own_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_a_thread_of_the_lowest_priority_and_a_panic_loses_only_its_answer() {
        let thread = LowPriority::start();
        let nice = thread.run(|| rustix::process::getpriority_process(Some(rustix::thread::gettid()))).await;
        assert_eq!(nice.unwrap().unwrap(), 19);
        assert_eq!(thread.run(|| -> u8 { panic!("a bad batch") }).await, None);
        assert_eq!(thread.run(|| 2 + 2).await, Some(4), "the thread goes on");
    }
}
