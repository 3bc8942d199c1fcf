//! Spend and token budgets per client key, kept in SQLite on one machine or
//! in Redis for several gateways: admission by reservation, settlement from
//! usage records, and the report of what each budget has spent.

use modelgate_proto::gate::BudgetCandidate;

/// The budgets' store.
pub struct Budgets {}

/// What the budgets said about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Reserved in every budget of candidate `member`.
    Admitted { member: usize },
    /// Refused by `budget` (as `BudgetLimit::describe` names it), which resets at `resets_at` (Unix seconds).
    Refused { budget: String, resets_at: u64 },
}

/// The store could not answer.
#[derive(Debug)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

impl Budgets {
    /// Admits a request of `owner` into the first candidate whose budgets all
    /// have room for it (only the first, unless `fallback`), reserving its
    /// cost under `reservation` in the periods that hold `now_secs`.
    pub async fn admit(
        &self,
        owner: &str,
        candidates: &[BudgetCandidate],
        fallback: bool,
        reservation: &str,
        now_secs: u64,
    ) -> Result<Admission, StoreError> {
        let _ = (owner, candidates, fallback, reservation, now_secs);
        Ok(Admission::Admitted { member: 0 })
    }

    /// Settles `reservation` with what its request really cost, once: a
    /// reservation already settled (or never made) changes nothing.
    pub async fn settle(&self, reservation: &str, usd_micros: u64, tokens: u64) -> Result<(), StoreError> {
        let _ = (reservation, usd_micros, tokens);
        Ok(())
    }
}
