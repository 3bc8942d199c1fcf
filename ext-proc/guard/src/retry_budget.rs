//! The stream guard's retry budget for fallback chains: retries in progress
//! may be at most a share of the requests in flight (and always a few), so a
//! failing backend cannot double the load on the others.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Default)]
pub struct RetryBudget {
    in_flight: AtomicUsize,
    retrying: AtomicUsize,
}

/// A request in flight, counted until dropped.
pub struct InFlight<'a>(&'a AtomicUsize);

/// A retry in progress, counted until dropped.
pub struct Retrying<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Retrying<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RetryBudget {
    pub fn enter(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    /// A retry, if the budget has room for one more: `percent` of the
    /// requests in flight, and at least `min` at once.
    pub fn try_retry(&self, percent: u32, min: u32) -> Option<Retrying<'_>> {
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let allowed = (in_flight.saturating_mul(percent as usize) / 100).max(min as usize);
        self.retrying
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| (now < allowed).then_some(now + 1))
            .ok()
            .map(|_| Retrying(&self.retrying))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_requests_in_flight_and_always_a_few() {
        let budget = RetryBudget::default();
        let requests: Vec<_> = (0..100).map(|_| budget.enter()).collect();
        let retries: Vec<_> = (0..30).filter_map(|_| budget.try_retry(20, 10)).collect();
        assert_eq!(retries.len(), 20, "a fifth of a hundred");
        drop(retries);
        drop(requests);
        let _one = budget.enter();
        let few: Vec<_> = (0..30).filter_map(|_| budget.try_retry(20, 10)).collect();
        assert_eq!(few.len(), 10, "the minimum when little is in flight");
        drop(few);
        assert!(budget.try_retry(20, 0).is_none(), "no minimum, one request: no retry");
    }
}
