//! Usage per key, model, backend and traffic (a client's own, or a batch's
//! lines) over a time window: the usage records,
//! summed per minute and kept for a configured number of hours.
//!
//! A minute is the finest grain a report has: a window `[start, end)` counts
//! every minute whose start lies in it, so a window that starts or ends
//! inside a minute includes that minute's records whole, or none of them.
//!
//! A batch of records becomes [`MinuteRow`]s, its sums per minute and group:
//! what [`crate::usage_store`] writes down and replays.

use modelgate_proto::usage::{Tally, Traffic, UsageRecord};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

pub const MINUTE_MS: u64 = 60_000;

/// Which requests a row sums: one key, one model, one backend, one kind of traffic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Group {
    pub key: String,
    pub model: String,
    pub backend: String,
    /// Left out where interactive, as rows kept before batches were.
    #[serde(default, skip_serializing_if = "Traffic::is_interactive")]
    pub traffic: Traffic,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// None while no record of the group had a price.
    pub cost_usd: Option<f64>,
    /// Answers served from the gateway's store (a cache hit or an idempotent
    /// repeat), counted in `requests` too. Absent from rows kept before there
    /// was a cache, and left out where 0 so such rows are written as before.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_hits: u64,
    /// Those answers' tokens: served, not used, so in neither `prompt_tokens` nor `completion_tokens`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One group's sums in one minute (since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinuteRow {
    pub minute: u64,
    #[serde(flatten)]
    pub group: Group,
    #[serde(flatten)]
    pub totals: Totals,
}

impl Totals {
    pub fn add(&mut self, other: &Totals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(other.completion_tokens);
        self.cache_hits = self.cache_hits.saturating_add(other.cache_hits);
        self.cached_tokens = self.cached_tokens.saturating_add(other.cached_tokens);
        self.cost_usd = match (self.cost_usd, other.cost_usd) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }

    /// One record's part. An answer served from the store used no tokens and costs nothing.
    fn of(record: &UsageRecord) -> Totals {
        let usage = record.usage.unwrap_or_default();
        let errors = u64::from(record.status >= 400);
        if record.served_from.is_some() {
            return Totals { requests: 1, errors, cache_hits: 1, cached_tokens: usage.total(), ..Totals::default() };
        }
        Totals {
            requests: 1,
            errors,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cost_usd: record.cost_usd,
            ..Totals::default()
        }
    }
}

/// One row of a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportRow {
    pub key: String,
    pub model: String,
    pub backend: String,
    pub traffic: Traffic,
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Summed over the records that had a price; null when none had.
    pub cost_usd: Option<f64>,
    /// Answers served from the gateway's store (cache hits and idempotent repeats), among `requests`.
    pub cache_hits: u64,
    /// Their tokens, in no other count: served from the store, not used, cost nothing.
    pub cached_tokens: u64,
}

/// `GET /v1/usage/report`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub object: &'static str,
    /// The window, in Unix seconds, as applied (defaults filled in).
    pub start: u64,
    pub end: u64,
    /// Sorted by key, model, backend and traffic.
    pub data: Vec<ReportRow>,
}

/// How long minutes are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    minutes: u64,
}

impl Retention {
    pub const fn hours(hours: u64) -> Self {
        Retention { minutes: hours.saturating_mul(60) }
    }

    /// The oldest minute still kept at `now_ms`.
    pub fn oldest_kept(&self, now_ms: u64) -> u64 {
        (now_ms / MINUTE_MS).saturating_sub(self.minutes)
    }

    /// When `minute` ages out, in Unix milliseconds.
    pub fn expiry_ms(&self, minute: u64) -> u64 {
        minute.saturating_add(self.minutes).saturating_add(1).saturating_mul(MINUTE_MS)
    }

    /// A batch's records and its tallies of refused requests summed per minute
    /// and group, in that order; what is already past retention at `now_ms` is
    /// left out, as it would be pruned at once.
    pub fn rows(&self, records: &[UsageRecord], tallies: &[Tally], now_ms: u64) -> Vec<MinuteRow> {
        let oldest = self.oldest_kept(now_ms);
        let mut sums: BTreeMap<(u64, Group), Totals> = BTreeMap::new();
        for record in records {
            let group = Group {
                key: record.key.clone(),
                model: record.model.clone(),
                backend: record.backend.clone(),
                traffic: record.traffic,
            };
            sums.entry((record.at_ms / MINUTE_MS, group)).or_default().add(&Totals::of(record));
        }
        // Refused before any backend: counted as requests (and errors), with no backend and no tokens.
        for tally in tallies {
            for refused in &tally.refused {
                let group = Group {
                    key: refused.key.clone(),
                    model: refused.model.clone(),
                    backend: String::new(),
                    traffic: refused.traffic,
                };
                let errors = if refused.status >= 400 { refused.count } else { 0 };
                let totals = Totals { requests: refused.count, errors, ..Totals::default() };
                sums.entry((tally.at_ms / MINUTE_MS, group)).or_default().add(&totals);
            }
        }
        sums.into_iter()
            .filter(|((minute, _), _)| *minute >= oldest)
            .map(|((minute, group), totals)| MinuteRow { minute, group, totals })
            .collect()
    }
}

/// Per-minute sums, by minute (since the Unix epoch) first, so a window is
/// a range and pruning takes the oldest minutes off the front.
#[derive(Debug)]
pub struct UsageStore {
    minutes: BTreeMap<u64, HashMap<Group, Totals>>,
    retention: Retention,
}

impl UsageStore {
    pub fn new(retention: Retention) -> Self {
        UsageStore { minutes: BTreeMap::new(), retention }
    }

    /// Adds rows to their minutes; rows past retention at `now_ms` are not kept.
    pub fn add(&mut self, rows: &[MinuteRow], now_ms: u64) {
        let oldest = self.retention.oldest_kept(now_ms);
        for row in rows.iter().filter(|row| row.minute >= oldest) {
            self.minutes.entry(row.minute).or_default().entry(row.group.clone()).or_default().add(&row.totals);
        }
    }

    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// Drops the minutes older than the retention at `now_ms`.
    pub fn prune(&mut self, now_ms: u64) {
        let oldest = self.retention.oldest_kept(now_ms);
        self.minutes = self.minutes.split_off(&oldest);
    }

    /// Every minute's rows, oldest first: what a snapshot keeps.
    pub fn rows(&self) -> impl Iterator<Item = MinuteRow> + '_ {
        self.minutes.iter().flat_map(|(minute, groups)| {
            groups.iter().map(|(group, totals)| MinuteRow { minute: *minute, group: group.clone(), totals: *totals })
        })
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
                traffic: group.traffic,
                requests: t.requests,
                errors: t.errors,
                prompt_tokens: t.prompt_tokens,
                completion_tokens: t.completion_tokens,
                total_tokens: t.prompt_tokens.saturating_add(t.completion_tokens),
                cost_usd: t.cost_usd,
                cache_hits: t.cache_hits,
                cached_tokens: t.cached_tokens,
            })
            .collect();
        Report { object: "usage.report", start, end, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelgate_proto::gate::ReplaySource;
    use modelgate_proto::usage::{Refused, Usage};
    use proptest::prelude::*;
    use serde_json::json;

    const HOUR_MS: u64 = 3_600_000;

    fn add(store: &mut UsageStore, record: &UsageRecord, now_ms: u64) {
        let rows = store.retention.rows(std::slice::from_ref(record), &[], now_ms);
        store.add(&rows, now_ms);
    }

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
        let mut store = UsageStore::new(Retention::hours(168));
        add(&mut store, &record(now - 5_000, "bob", "m", 200, (10, 5), Some(0.25)), now);
        add(&mut store, &record(now - 70_000, "bob", "m", 429, (0, 0), None), now);
        add(&mut store, &record(now - 1_000, "alice", "m", 200, (3, 4), None), now);
        add(&mut store, &UsageRecord { at_ms: now - 1_000, key: "alice".into(), ..UsageRecord::default() }, now);
        let line = UsageRecord { traffic: Traffic::Batch, ..record(now - 2_000, "bob", "m", 200, (7, 1), None) };
        add(&mut store, &line, now);
        let report = store.report(0, now / 1000 + 1);
        assert_eq!(
            serde_json::to_value(&report).unwrap(),
            json!({"object": "usage.report", "start": 0, "end": now / 1000 + 1, "data": [
                {"key": "alice", "model": "", "backend": "", "traffic": "interactive", "requests": 1, "errors": 0, "prompt_tokens": 0,
                 "completion_tokens": 0, "total_tokens": 0, "cost_usd": null, "cache_hits": 0, "cached_tokens": 0},
                {"key": "alice", "model": "m", "backend": "b", "traffic": "interactive", "requests": 1, "errors": 0, "prompt_tokens": 3,
                 "completion_tokens": 4, "total_tokens": 7, "cost_usd": null, "cache_hits": 0, "cached_tokens": 0},
                {"key": "bob", "model": "m", "backend": "b", "traffic": "interactive", "requests": 2, "errors": 1,
                 "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "cost_usd": 0.25, "cache_hits": 0, "cached_tokens": 0},
                {"key": "bob", "model": "m", "backend": "b", "traffic": "batch", "requests": 1, "errors": 0,
                 "prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8, "cost_usd": null, "cache_hits": 0, "cached_tokens": 0},
            ]})
        );
    }

    #[test]
    fn answers_served_from_the_store_count_as_requests_and_hits_with_tokens_apart_and_no_cost() {
        let now = 1000 * HOUR_MS;
        let mut store = UsageStore::new(Retention::hours(1));
        add(&mut store, &record(now, "k", "m", 200, (10, 5), Some(0.25)), now);
        for source in [ReplaySource::Cache, ReplaySource::Idempotency] {
            // A cost on a replay is no cost: nothing was used.
            let hit = UsageRecord { served_from: Some(source), ..record(now, "k", "m", 200, (10, 5), Some(1.0)) };
            add(&mut store, &hit, now);
        }
        let row = &store.report(0, u64::MAX).data[0];
        assert_eq!(
            (row.requests, row.prompt_tokens, row.completion_tokens, row.cost_usd, row.cache_hits, row.cached_tokens),
            (3, 10, 5, Some(0.25), 2, 30)
        );
    }

    #[test]
    fn rows_without_hits_are_written_and_read_as_before_there_was_a_cache() {
        let before = json!({"minute": 7, "key": "k", "model": "m", "backend": "b", "requests": 1, "errors": 0,
                            "prompt_tokens": 3, "completion_tokens": 4, "cost_usd": null});
        let row: MinuteRow = serde_json::from_value(before.clone()).unwrap();
        assert_eq!((row.totals.cache_hits, row.totals.cached_tokens), (0, 0));
        assert_eq!(serde_json::to_value(&row).unwrap(), before);
        let hits = MinuteRow { totals: Totals { cache_hits: 1, cached_tokens: 9, ..row.totals }, ..row };
        let written = serde_json::to_value(&hits).unwrap();
        assert_eq!((written["cache_hits"].clone(), written["cached_tokens"].clone()), (json!(1), json!(9)));
        assert_eq!(serde_json::from_value::<MinuteRow>(written).unwrap(), hits);
    }

    #[test]
    fn a_window_counts_the_minutes_that_start_in_it() {
        let now = 800_000;
        let mut store = UsageStore::new(Retention::hours(168));
        // Minutes starting at 600 s, 660 s and 720 s.
        for (at_ms, tokens) in [(600_000, 1), (659_999, 2), (660_000, 4), (719_000, 8), (720_000, 16)] {
            add(&mut store, &record(at_ms, "k", "m", 200, (tokens, 0), None), now);
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
        let mut store = UsageStore::new(Retention::hours(1));
        let now = 1000 * HOUR_MS;
        add(&mut store, &record(now - HOUR_MS, "k", "m", 200, (1, 0), None), now);
        add(&mut store, &record(now - HOUR_MS - MINUTE_MS, "k", "m", 200, (2, 0), None), now);
        assert_eq!(store.report(0, u64::MAX).data[0].prompt_tokens, 1, "a record past retention is dropped");
        store.prune(now + MINUTE_MS - 1);
        assert_eq!(store.report(0, u64::MAX).data[0].prompt_tokens, 1, "kept until its whole minute has aged out");
        store.prune(now + MINUTE_MS);
        assert!(store.report(0, u64::MAX).data.is_empty());
        assert!(store.minutes.is_empty());
    }

    #[test]
    fn costs_add_up_across_priced_records_only() {
        let now = 1000 * HOUR_MS;
        let mut store = UsageStore::new(Retention::hours(168));
        add(&mut store, &record(now, "k", "m", 200, (1, 1), None), now);
        add(&mut store, &record(now, "k", "m", 200, (1, 1), Some(0.5)), now);
        add(&mut store, &record(now - MINUTE_MS, "k", "m", 500, (1, 1), Some(0.25)), now);
        let row = &store.report(0, u64::MAX).data[0];
        assert_eq!((row.requests, row.errors, row.total_tokens, row.cost_usd), (3, 1, 6, Some(0.75)));
    }

    fn any_record() -> impl Strategy<Value = UsageRecord> {
        let names = prop::sample::select(vec!["", "a", "b"]);
        (0..5 * MINUTE_MS, names.clone(), names, prop::sample::select(vec![200u16, 429, 500]), 0..1000u64, 0..1000u64)
            .prop_flat_map(|(at_ms, key, model, status, prompt, completion)| {
                let served_from =
                    prop::option::of(prop::sample::select(vec![ReplaySource::Cache, ReplaySource::Idempotency]));
                (prop::option::of(prop::sample::select(vec![0.25, 0.5, 2.0])), served_from).prop_map(
                    move |(cost, served_from)| UsageRecord {
                        served_from,
                        ..record(HOUR_MS + at_ms, key, model, status, (prompt, completion), cost)
                    },
                )
            })
    }

    proptest! {
        /// A batch's rows add up to what its records add up to one by one, and a
        /// store rebuilt from another's rows (a snapshot) reports the same.
        #[test]
        fn batches_and_snapshots_sum_as_records_do(batches in prop::collection::vec(prop::collection::vec(any_record(), 0..8), 0..6)) {
            let now = HOUR_MS + 5 * MINUTE_MS;
            let retention = Retention::hours(1);
            let (mut by_record, mut by_batch) = (UsageStore::new(retention), UsageStore::new(retention));
            for batch in &batches {
                for record in batch {
                    add(&mut by_record, record, now);
                }
                by_batch.add(&retention.rows(batch, &[], now), now);
            }
            let mut restored = UsageStore::new(retention);
            restored.add(&by_batch.rows().collect::<Vec<_>>(), now);
            for (start, end) in [(0, u64::MAX), (3660, 3720), (3700, 3900)] {
                let expected = by_record.report(start, end);
                prop_assert_eq!(&by_batch.report(start, end), &expected);
                prop_assert_eq!(&restored.report(start, end), &expected);
            }
        }
    }

    #[test]
    fn refusals_add_to_the_rows_records_make() {
        let now = 1000 * HOUR_MS;
        let retention = Retention::hours(1);
        let mut store = UsageStore::new(retention);
        let record = UsageRecord { at_ms: now, key: "k".into(), status: 404, ..UsageRecord::default() };
        let refused = Refused {
            key: "k".into(),
            model: String::new(),
            model_served: false,
            status: 404,
            count: 9,
            ..Refused::default()
        };
        let tally = |at_ms| Tally { at_ms, refused: vec![refused.clone()], dropped_records: 0, ..Tally::default() };
        store.add(&retention.rows(&[record], &[tally(now), tally(now - 2 * HOUR_MS)], now), now);
        let row = &store.report(0, u64::MAX).data[0];
        assert_eq!((row.key.as_str(), row.model.as_str(), row.requests, row.errors), ("k", "", 10, 10));
    }
}
