//! Spend and token budgets per client key, kept in SQLite on one machine or
//! in Redis for several gateways: admission by reservation, settlement from
//! usage records, and the report of what each budget has spent.
//!
//! Each budget of each period has a counter ([`BudgetLimit::counter`]):
//! its limit (the latest a request sent), what is spent and what is
//! reserved. A request is admitted into the first candidate backend whose
//! budgets all have `spent + reserved + cost ≤ limit`, and then reserves its
//! cost in every one of them, in one atomic step, so requests admitted at
//! the same time never reserve past a limit together. Its usage record
//! settles the reservation once: what it really cost is spent, what it
//! reserved is released. The overrun of a budget is bounded by what its
//! admitted requests cost beyond their reservations (none, when the
//! reservation is the most a request may cost).
//!
//! Periods follow ext-proc's clock (`now_secs`), not the store's, so every
//! gateway sharing a Redis must keep time. A counter and a reservation are
//! kept [`GRACE_SECS`] after their period ends, so a request that ends just
//! after the period it was admitted in is still charged there.

mod redis_store;
mod sqlite_store;

use modelgate_proto::budgets::{period_id, resets_at, BudgetLimit, BudgetUnit};
use modelgate_proto::gate::BudgetCandidate;
use modelgate_proto::usage::bounded;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

use redis_store::RedisBudgets;
use sqlite_store::SqliteBudgets;

/// How long a counter or a reservation is kept after its period ends.
pub const GRACE_SECS: u64 = 3 * 86_400;

/// How long a settlement that found no reservation keeps its id from
/// being reserved: the admission may land after it, its answer lost (a
/// timeout), and its request is then settled already.
pub const TOMBSTONE_SECS: u64 = 600;

/// The largest amount a counter holds: both stores count exactly up to here
/// (Redis's scripts compute in doubles), and no real budget comes near it
/// (2^53 millionths of a dollar is nine billion dollars).
const MAX_AMOUNT: u64 = 1 << 53;

/// The budgets' store.
pub struct Budgets {
    store: Store,
    refusals: Family<KeyLabel, Counter>,
}

enum Store {
    Sqlite(SqliteBudgets),
    Redis(RedisBudgets),
}

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

/// What a settled request is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Charge {
    /// What it really cost.
    Real { usd_micros: u64, tokens: u64 },
    /// What it reserved: its real cost is not known.
    Reserved,
}

/// One counter a candidate reserves in, and what it is named and limited to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hold {
    counter: String,
    unit: BudgetUnit,
    limit: u64,
    amount: u64,
    /// As a refusal names the budget.
    describe: String,
    info: CounterInfo,
}

/// What the report says about a counter besides its amounts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CounterInfo {
    owner: String,
    scope: String,
    amount_name: &'static str,
    period: String,
    resets_at: u64,
}

/// A counter as the stores read it back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CounterState {
    owner: String,
    scope: String,
    amount_name: String,
    period: String,
    unit: BudgetUnit,
    limit: u64,
    spent: u64,
    reserved: u64,
    resets_at: u64,
}

/// What a store's admission step decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Admitted {
        member: usize,
    },
    /// The first budget that refused: hold `hold` of candidate `member`.
    Refused {
        member: usize,
        hold: usize,
    },
}

/// Each candidate's holds: its budgets' counters in the periods of
/// `now_secs`, each with the request's cost in that budget's unit. A
/// counter named twice in one candidate is held once, for both amounts,
/// under the lower limit.
fn plan(owner: &str, candidates: &[BudgetCandidate], now_secs: u64) -> Vec<Vec<Hold>> {
    candidates
        .iter()
        .map(|candidate| {
            let mut holds: Vec<Hold> = Vec::with_capacity(candidate.budgets.len());
            for budget in &candidate.budgets {
                let amount = match budget.unit {
                    BudgetUnit::Usd => candidate.usd_micros,
                    BudgetUnit::Tokens => candidate.tokens,
                }
                .min(MAX_AMOUNT);
                let hold = hold(owner, budget, amount, now_secs);
                match holds.iter_mut().find(|held| held.counter == hold.counter) {
                    Some(held) => {
                        held.amount = (held.amount + hold.amount).min(MAX_AMOUNT);
                        held.limit = held.limit.min(hold.limit);
                    }
                    None => holds.push(hold),
                }
            }
            holds
        })
        .collect()
}

fn hold(owner: &str, budget: &BudgetLimit, amount: u64, now_secs: u64) -> Hold {
    Hold {
        counter: budget.counter(owner, now_secs),
        unit: budget.unit,
        limit: budget.limit.min(MAX_AMOUNT),
        amount,
        describe: budget.describe(owner),
        info: CounterInfo {
            owner: owner.to_string(),
            scope: budget.scope.clone(),
            amount_name: budget.amount_name(),
            period: period_id(budget.period, now_secs),
            resets_at: resets_at(budget.period, now_secs),
        },
    }
}

/// What `holds` reserved, charged as `charge` says, in a hold of `unit`.
fn charged(charge: Charge, unit: BudgetUnit, reserved: u64) -> u64 {
    match charge {
        Charge::Real { usd_micros, .. } if unit == BudgetUnit::Usd => usd_micros.min(MAX_AMOUNT),
        Charge::Real { tokens, .. } => tokens.min(MAX_AMOUNT),
        Charge::Reserved => reserved,
    }
}

/// When a reservation of `holds` is forgotten: with the last of its counters.
fn reservation_expiry(holds: &[Hold]) -> u64 {
    holds.iter().map(|hold| hold.info.resets_at).max().unwrap_or(0) + GRACE_SECS
}

/// A reservation id is what the filter makes (hex), and becomes a store key:
/// short and plain.
pub fn valid_reservation(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Budgets {
    /// Budgets in Redis when `redis_url` is given (each call bounded by
    /// `redis_timeout`; connected lazily, so a Redis down at start only fails
    /// the calls made while it is), else in `<data_dir>/budgets.sqlite`.
    pub fn open(data_dir: &Path, redis_url: Option<&str>, redis_timeout: Duration) -> Result<Self, StoreError> {
        let store = match redis_url {
            Some(url) => Store::Redis(RedisBudgets::new(url, redis_timeout)?),
            None => {
                std::fs::create_dir_all(data_dir)
                    .map_err(|e| StoreError(format!("creating {}: {e}", data_dir.display())))?;
                Store::Sqlite(SqliteBudgets::open(&data_dir.join("budgets.sqlite"))?)
            }
        };
        Ok(Budgets { store, refusals: Family::default() })
    }

    /// Budgets in an SQLite database in memory, lost with the process: for tests.
    pub fn in_memory() -> Self {
        let store = SqliteBudgets::open(Path::new(":memory:")).expect("an SQLite database in memory opens");
        Budgets { store: Store::Sqlite(store), refusals: Family::default() }
    }

    /// Admits a request of `owner` into the first candidate whose budgets all
    /// have room for it (only the first, unless `fallback`), reserving its
    /// cost under `reservation` in the periods that hold `now_secs`. A
    /// reservation already made is answered as it was, and not made twice.
    pub async fn admit(
        &self,
        owner: &str,
        candidates: &[BudgetCandidate],
        fallback: bool,
        reservation: &str,
        now_secs: u64,
    ) -> Result<Admission, StoreError> {
        if candidates.is_empty() {
            return Ok(Admission::Admitted { member: 0 });
        }
        if !valid_reservation(reservation) {
            return Err(StoreError(format!(
                "the reservation id {:?} is not 1 to 64 letters, digits, - or _",
                bounded(reservation)
            )));
        }
        let plan = plan(owner, candidates, now_secs);
        let tried = if fallback { plan.len() } else { 1 };
        let decision = match &self.store {
            Store::Sqlite(store) => store.admit(reservation, &plan[..tried], now_secs).await?,
            Store::Redis(store) => store.admit(reservation, &plan[..tried], now_secs).await?,
        };
        Ok(match decision {
            Decision::Admitted { member } => Admission::Admitted { member },
            Decision::Refused { member, hold } => {
                self.refusals.get_or_create(&KeyLabel { key: bounded(owner).to_string() }).inc();
                let hold = &plan[member][hold];
                Admission::Refused { budget: hold.describe.clone(), resets_at: hold.info.resets_at }
            }
        })
    }

    /// Settles `reservation` with what its request really cost, once: a
    /// reservation already settled (or never made) changes nothing.
    pub async fn settle(&self, reservation: &str, usd_micros: u64, tokens: u64) -> Result<(), StoreError> {
        self.charge(reservation, Charge::Real { usd_micros, tokens }).await
    }

    /// Settles `reservation` with what it reserved, once: for a request
    /// that was answered but whose usage is not known, so it may have cost
    /// as much as it could.
    pub async fn settle_as_reserved(&self, reservation: &str) -> Result<(), StoreError> {
        self.charge(reservation, Charge::Reserved).await
    }

    async fn charge(&self, reservation: &str, charge: Charge) -> Result<(), StoreError> {
        if !valid_reservation(reservation) {
            // Never made: there is nothing to settle.
            return Ok(());
        }
        match &self.store {
            Store::Sqlite(store) => store.settle(reservation, charge).await,
            Store::Redis(store) => store.settle(reservation, charge).await,
        }
    }

    /// Every budget counter of the periods holding `now_secs` that a request
    /// touched, of one key or of all, sorted by key, scope and amount.
    pub async fn report(&self, key: Option<&str>, now_secs: u64) -> Result<BudgetReport, StoreError> {
        let mut counters = match &self.store {
            Store::Sqlite(store) => store.counters(key, now_secs).await?,
            Store::Redis(store) => store.counters(key, now_secs).await?,
        };
        counters.sort_by(|a, b| {
            (&a.owner, &a.scope, &a.amount_name, &a.period).cmp(&(&b.owner, &b.scope, &b.amount_name, &b.period))
        });
        Ok(BudgetReport { object: "list", data: counters.into_iter().map(BudgetRow::from).collect() })
    }

    /// `modelgate_budget_refusals_total{key}`, for the admin port's `/metrics`.
    pub fn metrics(&self) -> Box<dyn Collector> {
        Box::new(BudgetMetrics { refusals: self.refusals.clone() })
    }
}

/// `GET /v1/usage/budgets`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetReport {
    pub object: &'static str,
    pub data: Vec<BudgetRow>,
}

/// One budget's counter in its current period: dollars as dollars, tokens as tokens.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetRow {
    pub key: String,
    pub scope: String,
    /// `usd_per_day`, `tokens_per_month`...
    pub amount: String,
    /// `2026-12-02` or `2026-12`.
    pub period: String,
    pub limit: serde_json::Number,
    pub spent: serde_json::Number,
    pub reserved: serde_json::Number,
    /// When the period ends, in seconds since the Unix epoch.
    pub resets_at: u64,
}

impl From<CounterState> for BudgetRow {
    fn from(counter: CounterState) -> Self {
        let shown = |amount: u64| match counter.unit {
            BudgetUnit::Usd => serde_json::Number::from_f64(amount as f64 / 1e6).unwrap_or_else(|| 0.into()),
            BudgetUnit::Tokens => amount.into(),
        };
        BudgetRow {
            limit: shown(counter.limit),
            spent: shown(counter.spent),
            reserved: shown(counter.reserved),
            key: counter.owner,
            scope: counter.scope,
            amount: counter.amount_name,
            period: counter.period,
            resets_at: counter.resets_at,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabel {
    key: String,
}

#[derive(Debug)]
struct BudgetMetrics {
    refusals: Family<KeyLabel, Counter>,
}

impl Collector for BudgetMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let family = encoder.encode_descriptor(
            "modelgate_budget_refusals",
            "Requests refused because a budget of their key was spent (429 insufficient_quota)",
            None,
            self.refusals.metric_type(),
        )?;
        self.refusals.encode(family)
    }
}

/// A unit as the stores write it.
fn unit_name(unit: BudgetUnit) -> &'static str {
    match unit {
        BudgetUnit::Usd => "usd",
        BudgetUnit::Tokens => "tokens",
    }
}

fn unit_named(name: &str) -> Result<BudgetUnit, StoreError> {
    match name {
        "usd" => Ok(BudgetUnit::Usd),
        "tokens" => Ok(BudgetUnit::Tokens),
        other => Err(StoreError(format!("a budget counter of unknown unit {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelgate_proto::budgets::Period;

    fn limit(scope: &str, unit: BudgetUnit, period: Period, limit: u64) -> BudgetLimit {
        BudgetLimit { scope: scope.into(), unit, period, limit }
    }

    #[test]
    fn a_candidate_holds_each_counter_once_in_its_unit() {
        let day = 1_796_169_600; // 2026-12-02T00:00:00Z
        let candidate = BudgetCandidate {
            backend: "b".into(),
            budgets: vec![
                limit("key", BudgetUnit::Usd, Period::Day, 5_000_000),
                limit("key", BudgetUnit::Tokens, Period::Month, 1000),
                limit("key", BudgetUnit::Usd, Period::Day, 4_000_000),
            ],
            usd_micros: 30,
            tokens: 120,
        };
        let plan = plan("alice", &[candidate], day + 5);
        let holds: Vec<_> = plan[0].iter().map(|h| (h.counter.as_str(), h.unit, h.limit, h.amount)).collect();
        assert_eq!(
            holds,
            [
                ("alice|key|usd_per_day|2026-12-02", BudgetUnit::Usd, 4_000_000, 60),
                ("alice|key|tokens_per_month|2026-12", BudgetUnit::Tokens, 1000, 120),
            ]
        );
        assert_eq!(plan[0][0].describe, "usd_per_day of key `alice`");
        assert_eq!(plan[0][0].info.resets_at, day + 86_400);
        assert_eq!(reservation_expiry(&plan[0]), 1_798_761_600 + GRACE_SECS);
    }

    #[test]
    fn amounts_show_in_their_unit() {
        let counter = |unit| CounterState {
            owner: "k".into(),
            scope: "key".into(),
            amount_name: "usd_per_day".into(),
            period: "2026-12-02".into(),
            unit,
            limit: 5_000_000,
            spent: 1_250_000,
            reserved: 1,
            resets_at: 9,
        };
        let row = serde_json::to_value(BudgetRow::from(counter(BudgetUnit::Usd))).unwrap();
        assert_eq!(row["limit"], 5.0);
        assert_eq!(row["spent"], 1.25);
        assert_eq!(row["reserved"], 0.000001);
        let row = serde_json::to_value(BudgetRow::from(counter(BudgetUnit::Tokens))).unwrap();
        assert_eq!((row["limit"].as_u64(), row["spent"].as_u64()), (Some(5_000_000), Some(1_250_000)));
    }

    #[test]
    fn reservation_ids_are_short_and_plain() {
        assert!(valid_reservation("0a1b-2c_3d"));
        for bad in ["", "a b", "a|b", "é", &"x".repeat(65)] {
            assert!(!valid_reservation(bad), "{bad:?}");
        }
    }
}
