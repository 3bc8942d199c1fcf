//! What an Envoy worker sends to ext-proc's admin port on its timer: usage
//! records, one JSON object per line, and the settlements of shared token
//! reservations, summed per bucket. Neither adds a call to any request.

use modelgate_proto::limits::{BucketSpend, Reserved, SpendRequest};
use modelgate_proto::usage::UsageRecord;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};

/// Records held while ext-proc cannot take them; past this, new ones are dropped and counted.
const MAX_HELD_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct Outbox {
    lines: RefCell<Vec<u8>>,
    dropped: Cell<u64>,
    /// Tokens to settle in shared token buckets, by bucket name: the bucket's
    /// limit, and the tokens to charge (or, below zero, to give back).
    settlements: RefCell<BTreeMap<String, (u64, i64)>>,
    /// Debits sent whose outcome is unknown: sent again as they were, with
    /// their id, so that the store applies each once.
    unconfirmed: RefCell<VecDeque<Debits>>,
    /// Debits dropped since the last look: unconfirmed for longer than the store remembers their ids.
    dropped_debits: Cell<u64>,
    /// The ids of this worker's debits: a random prefix, and a count.
    debit_ids: Cell<(u64, u64)>,
}

/// One batch of debits for the shared store, and when it was first sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Debits {
    pub request: SpendRequest,
    pub first_sent_us: u64,
}

/// How long a debit is sent again until it lands: well within the ten
/// minutes ext-proc's store remembers a debit's id, so a late retry of a
/// debit that did land is still recognised. A debit that cannot land for
/// this long is dropped (and logged).
const DEBIT_RETRY_US: u64 = 5 * 60 * 1_000_000;

impl Outbox {
    pub fn push(&self, record: &UsageRecord) {
        let mut lines = self.lines.borrow_mut();
        if lines.len() >= MAX_HELD_BYTES {
            self.dropped.set(self.dropped.get() + 1);
            return;
        }
        if serde_json::to_writer(&mut *lines, record).is_ok() {
            lines.push(b'\n');
        }
    }

    /// Everything held, to send; `None` when there is nothing.
    pub fn take(&self) -> Option<Vec<u8>> {
        let lines = std::mem::take(&mut *self.lines.borrow_mut());
        (!lines.is_empty()).then_some(lines)
    }

    /// Settles an answer's tokens with what its request reserved in the
    /// shared store's token buckets ([`Reserved::settlement`]), with the next batch.
    pub fn settle(&self, reserved: &[Reserved], used: Option<u64>, now_us: u64) {
        let mut settlements = self.settlements.borrow_mut();
        for held in reserved {
            let tokens = held.settlement(used, now_us);
            if tokens != 0 {
                let (_, net) = settlements.entry(held.bucket.clone()).or_insert((held.per_minute, 0));
                *net = net.saturating_add(tokens);
            }
        }
    }

    /// The debits to send at `now_us`: those whose outcome is unknown, as
    /// they were, and every settlement held since, as a new batch.
    pub fn take_debits(&self, now_us: u64) -> Vec<Debits> {
        let mut batches: Vec<Debits> = self.unconfirmed.borrow_mut().drain(..).collect();
        let before = batches.len();
        batches.retain(|batch| now_us.saturating_sub(batch.first_sent_us) < DEBIT_RETRY_US);
        self.dropped_debits.set(self.dropped_debits.get() + (before - batches.len()) as u64);
        let settlements = std::mem::take(&mut *self.settlements.borrow_mut());
        let buckets: Vec<BucketSpend> = settlements
            .into_iter()
            .filter(|(_, (_, net))| *net != 0)
            .map(|(name, (per_minute, net))| BucketSpend {
                name,
                per_minute,
                cost: u64::try_from(net).unwrap_or(0),
                refund: if net < 0 { net.unsigned_abs() } else { 0 },
            })
            .collect();
        if !buckets.is_empty() {
            let request = SpendRequest { buckets, debit: true, id: Some(self.next_debit_id()) };
            batches.push(Debits { request, first_sent_us: now_us });
        }
        batches
    }

    /// A new debit id, unique to this worker (its prefix is random) and to the batch.
    fn next_debit_id(&self) -> String {
        let (mut prefix, count) = self.debit_ids.get();
        if prefix == 0 {
            use std::hash::BuildHasher;
            // Seeded by the host's randomness (WASI's random_get inside Envoy).
            prefix = std::collections::hash_map::RandomState::new().hash_one(count).max(1);
        }
        self.debit_ids.set((prefix, count + 1));
        format!("{prefix:016x}-{count}")
    }

    /// Records sent that did not land: kept for the next try, within the cap.
    pub fn put_back(&self, sent: Vec<u8>) {
        let mut lines = self.lines.borrow_mut();
        if lines.len() + sent.len() > MAX_HELD_BYTES {
            let records = sent.iter().filter(|b| **b == b'\n').count() as u64;
            self.dropped.set(self.dropped.get() + records);
            return;
        }
        lines.extend_from_slice(&sent);
    }

    /// Debits sent whose outcome is unknown (no answer, or an error): sent again with the next batch.
    pub fn put_back_debits(&self, sent: Debits) {
        self.unconfirmed.borrow_mut().push_back(sent);
    }

    /// Debits dropped since the last call, for the log.
    pub fn take_dropped_debits(&self) -> u64 {
        self.dropped_debits.replace(0)
    }

    /// Records dropped since the last call, for the log.
    pub fn take_dropped(&self) -> u64 {
        self.dropped.replace(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_leave_as_json_lines_once() {
        let outbox = Outbox::default();
        assert_eq!(outbox.take(), None);
        let record = UsageRecord { request_id: "r1".into(), status: 200, ..UsageRecord::default() };
        outbox.push(&record);
        outbox.push(&UsageRecord { request_id: "r2".into(), ..record.clone() });
        let sent = outbox.take().unwrap();
        let lines: Vec<UsageRecord> =
            sent.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect();
        assert_eq!(lines.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(), ["r1", "r2"]);
        assert_eq!(outbox.take(), None);
        outbox.put_back(sent.clone());
        assert_eq!(outbox.take(), Some(sent));
    }

    #[test]
    fn settlements_are_summed_per_token_bucket_and_a_lost_batch_is_sent_again_as_it_was() {
        let outbox = Outbox::default();
        assert_eq!(outbox.take_debits(0), []);
        let held =
            |bucket: &str, tokens| Reserved { bucket: bucket.into(), per_minute: 60, tokens, until_us: 60_000_000 };
        // 20 reserved in the key's bucket and the model's; 5 used; a second answer over its 10 by 7.
        outbox.settle(&[held("t", 20), held("t.m", 20)], Some(5), 0);
        outbox.settle(&[held("t", 10)], Some(17), 0);
        outbox.settle(&[held("t", 10)], None, 0);
        let first = outbox.take_debits(1_000);
        assert_eq!(first.len(), 1);
        let sent = &first[0].request;
        assert!(sent.debit);
        let nets: Vec<(&str, u64, u64)> = sent.buckets.iter().map(|b| (b.name.as_str(), b.cost, b.refund)).collect();
        assert_eq!(nets, [("t", 0, 8), ("t.m", 0, 15)]);
        assert_eq!(outbox.take_debits(2_000), []);
        // A batch whose answer was lost goes again with its id, apart from what came since.
        outbox.put_back_debits(first[0].clone());
        outbox.settle(&[held("t", 0)], Some(3), 0);
        let again = outbox.take_debits(3_000);
        assert_eq!(again.len(), 2);
        assert_eq!(again[0], first[0]);
        assert_ne!(again[1].request.id, first[0].request.id);
        assert_eq!((again[1].request.buckets[0].cost, again[1].first_sent_us), (3, 3_000));
        // Past the retry window, a batch is dropped and counted.
        outbox.put_back_debits(first[0].clone());
        assert_eq!(outbox.take_debits(1_000 + DEBIT_RETRY_US), []);
        assert_eq!(outbox.take_dropped_debits(), 1);
    }

    #[test]
    fn a_full_outbox_drops_and_counts() {
        let outbox = Outbox::default();
        let big = UsageRecord { request_id: "x".repeat(MAX_HELD_BYTES), ..UsageRecord::default() };
        outbox.push(&big);
        outbox.push(&big);
        assert_eq!(outbox.take_dropped(), 1);
        assert_eq!(outbox.take_dropped(), 0);
    }
}
