//! Usage per key, model and backend over a time window: the usage records,
//! summed per minute and kept for a configured number of hours.
//!
//! A minute is the finest grain a report has: a window `[start, end)` counts
//! every minute whose start lies in it, so a window that starts or ends
//! inside a minute includes that minute's records whole, or none of them.

use modelgate_proto::usage::{Refused, UsageRecord};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

const MINUTE_MS: u64 = 60_000;

/// Which requests a row sums: one key, one model, one backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Group {
    key: String,
    model: String,
    backend: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Totals {
    requests: u64,
    errors: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// None while no record of the group had a price.
    cost_usd: Option<f64>,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(other.completion_tokens);
        self.cost_usd = match (self.cost_usd, other.cost_usd) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }

    fn of(record: &UsageRecord) -> Totals {
        let usage = record.usage.unwrap_or_default();
        Totals {
            requests: 1,
            errors: u64::from(record.status >= 400),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cost_usd: record.cost_usd,
        }
    }
}

/// One row of a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportRow {
    pub key: String,
    pub model: String,
    pub backend: String,
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Summed over the records that had a price; null when none had.
    pub cost_usd: Option<f64>,
}

/// `GET /v1/usage/report`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub object: &'static str,
    /// The window, in Unix seconds, as applied (defaults filled in).
    pub start: u64,
    pub end: u64,
    /// Sorted by key, model and backend.
    pub data: Vec<ReportRow>,
}

/// Per-minute sums, by minute (since the Unix epoch) first, so a window is
/// a range and pruning takes the oldest minutes off the front.
#[derive(Debug, Default)]
pub struct UsageStore {
    minutes: BTreeMap<u64, HashMap<Group, Totals>>,
    retention_minutes: u64,
}

impl UsageStore {
    pub fn new(retention_hours: u64) -> Self {
        UsageStore { minutes: BTreeMap::new(), retention_minutes: retention_hours.saturating_mul(60) }
    }

    /// Adds one record to its minute; a record already past retention at
    /// `now_ms` is not kept, as it would be pruned at once.
    pub fn add(&mut self, record: &UsageRecord, now_ms: u64) {
        let group = Group { key: record.key.clone(), model: record.model.clone(), backend: record.backend.clone() };
        self.add_totals(record.at_ms, group, &Totals::of(record), now_ms);
    }

    /// Adds requests refused before any backend, counted until `at_ms`, as [`UsageStore::add`] does a record.
    pub fn add_refused(&mut self, refused: &Refused, at_ms: u64, now_ms: u64) {
        let group = Group { key: refused.key.clone(), model: refused.model.clone(), backend: String::new() };
        let errors = if refused.status >= 400 { refused.count } else { 0 };
        self.add_totals(at_ms, group, &Totals { requests: refused.count, errors, ..Totals::default() }, now_ms);
    }

    fn add_totals(&mut self, at_ms: u64, group: Group, totals: &Totals, now_ms: u64) {
        let minute = at_ms / MINUTE_MS;
        if minute < self.oldest_kept(now_ms) {
            return;
        }
        self.minutes.entry(minute).or_default().entry(group).or_default().add(totals);
    }

    /// Drops the minutes older than the retention at `now_ms`.
    pub fn prune(&mut self, now_ms: u64) {
        let oldest = self.oldest_kept(now_ms);
        self.minutes = self.minutes.split_off(&oldest);
    }

    fn oldest_kept(&self, now_ms: u64) -> u64 {
        (now_ms / MINUTE_MS).saturating_sub(self.retention_minutes)
    }

    /// Totals over the minutes that start in `[start, end)` (Unix seconds).
    pub fn report(&self, start: u64, end: u64) -> Report {
        let mut rows: BTreeMap<&Group, Totals> = BTreeMap::new();
        let (first, past_last) = (start.div_ceil(60), end.div_ceil(60));
        if first < past_last {
            for groups in self.minutes.range(first..past_last).map(|(_, groups)| groups) {
                for (group, totals) in groups {
                    rows.entry(group).or_default().add(totals);
                }
            }
        }
        let data = rows
            .into_iter()
            .map(|(group, t)| ReportRow {
                key: group.key.clone(),
                model: group.model.clone(),
                backend: group.backend.clone(),
                requests: t.requests,
                errors: t.errors,
                prompt_tokens: t.prompt_tokens,
                completion_tokens: t.completion_tokens,
                total_tokens: t.prompt_tokens.saturating_add(t.completion_tokens),
                cost_usd: t.cost_usd,
            })
            .collect();
        Report { object: "usage.report", start, end, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelgate_proto::usage::Usage;
    use serde_json::json;

    const HOUR_MS: u64 = 3_600_000;

    fn record(at_ms: u64, key: &str, model: &str, status: u16, tokens: (u64, u64), cost: Option<f64>) -> UsageRecord {
        UsageRecord {
            request_id: "r".into(),
            at_ms,
            key: key.into(),
            model: model.into(),
            backend: "b".into(),
            status,
            usage: Some(Usage { prompt_tokens: tokens.0, completion_tokens: tokens.1 }),
            cost_usd: cost,
            ..UsageRecord::default()
        }
    }

    #[test]
    fn rows_sum_per_key_model_and_backend_sorted() {
        let now = 1000 * HOUR_MS;
        let mut store = UsageStore::new(168);
        store.add(&record(now - 5_000, "bob", "m", 200, (10, 5), Some(0.25)), now);
        store.add(&record(now - 70_000, "bob", "m", 429, (0, 0), None), now);
        store.add(&record(now - 1_000, "alice", "m", 200, (3, 4), None), now);
        store.add(&UsageRecord { at_ms: now - 1_000, key: "alice".into(), ..UsageRecord::default() }, now);
        let report = store.report(0, now / 1000 + 1);
        assert_eq!(
            serde_json::to_value(&report).unwrap(),
            json!({"object": "usage.report", "start": 0, "end": now / 1000 + 1, "data": [
                {"key": "alice", "model": "", "backend": "", "requests": 1, "errors": 0, "prompt_tokens": 0,
                 "completion_tokens": 0, "total_tokens": 0, "cost_usd": null},
                {"key": "alice", "model": "m", "backend": "b", "requests": 1, "errors": 0, "prompt_tokens": 3,
                 "completion_tokens": 4, "total_tokens": 7, "cost_usd": null},
                {"key": "bob", "model": "m", "backend": "b", "requests": 2, "errors": 1, "prompt_tokens": 10,
                 "completion_tokens": 5, "total_tokens": 15, "cost_usd": 0.25},
            ]})
        );
    }

    #[test]
    fn a_window_counts_the_minutes_that_start_in_it() {
        let now = 800_000;
        let mut store = UsageStore::new(168);
        // Minutes starting at 600 s, 660 s and 720 s.
        for (at_ms, tokens) in [(600_000, 1), (659_999, 2), (660_000, 4), (719_000, 8), (720_000, 16)] {
            store.add(&record(at_ms, "k", "m", 200, (tokens, 0), None), now);
        }
        let tokens = |start, end| store.report(start, end).data.first().map_or(0, |row| row.prompt_tokens);
        assert_eq!(tokens(600, 660), 3);
        assert_eq!(tokens(600, 661), 15, "the minute starting at 660 s counts whole");
        assert_eq!(tokens(601, 720), 12, "the minute starting at 600 s began before the window");
        assert_eq!(tokens(660, 780), 28);
        assert_eq!(tokens(0, u64::MAX), 31);
        assert_eq!(tokens(660, 660), 0);
        assert_eq!(tokens(700, 600), 0);
        assert!(store.report(0, 600).data.is_empty());
    }

    #[test]
    fn old_minutes_are_pruned_and_never_stored() {
        let mut store = UsageStore::new(1);
        let now = 1000 * HOUR_MS;
        store.add(&record(now - HOUR_MS, "k", "m", 200, (1, 0), None), now);
        store.add(&record(now - HOUR_MS - MINUTE_MS, "k", "m", 200, (2, 0), None), now);
        assert_eq!(store.report(0, u64::MAX).data[0].prompt_tokens, 1, "a record past retention is dropped");
        store.prune(now + MINUTE_MS - 1);
        assert_eq!(store.report(0, u64::MAX).data[0].prompt_tokens, 1, "kept until its whole minute has aged out");
        store.prune(now + MINUTE_MS);
        assert!(store.report(0, u64::MAX).data.is_empty());
        assert!(store.minutes.is_empty());
    }

    #[test]
    fn refusals_add_to_the_rows_records_make() {
        let now = 1000 * HOUR_MS;
        let mut store = UsageStore::new(1);
        store.add(&UsageRecord { at_ms: now, key: "k".into(), status: 404, ..UsageRecord::default() }, now);
        let refused = Refused { key: "k".into(), model: String::new(), model_served: false, status: 404, count: 9 };
        store.add_refused(&refused, now, now);
        store.add_refused(&refused, now - 2 * HOUR_MS, now);
        let row = &store.report(0, u64::MAX).data[0];
        assert_eq!((row.key.as_str(), row.model.as_str(), row.requests, row.errors), ("k", "", 10, 10));
    }

    #[test]
    fn costs_add_up_across_priced_records_only() {
        let now = 1000 * HOUR_MS;
        let mut store = UsageStore::new(168);
        store.add(&record(now, "k", "m", 200, (1, 1), None), now);
        store.add(&record(now, "k", "m", 200, (1, 1), Some(0.5)), now);
        store.add(&record(now - MINUTE_MS, "k", "m", 500, (1, 1), Some(0.25)), now);
        let row = &store.report(0, u64::MAX).data[0];
        assert_eq!((row.requests, row.errors, row.total_tokens, row.cost_usd), (3, 1, 6, Some(0.75)));
    }
}
