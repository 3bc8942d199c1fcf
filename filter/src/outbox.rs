//! What an Envoy worker sends to ext-proc's admin port on its timer: usage
//! records, one JSON object per line, and the tokens answers spent from
//! shared rate limits, summed per bucket. Neither adds a call to any request.

use modelgate_proto::limits::{Bucket, BucketSpend, SpendRequest, Unit};
use modelgate_proto::usage::UsageRecord;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

/// Records held while ext-proc cannot take them; past this, new ones are dropped and counted.
const MAX_HELD_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct Outbox {
    lines: RefCell<Vec<u8>>,
    dropped: Cell<u64>,
    /// Tokens to debit from shared token buckets, by bucket name.
    debits: RefCell<BTreeMap<String, BucketSpend>>,
}

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

    /// Tokens an answer used, to be spent from the shared store's token buckets.
    pub fn debit(&self, buckets: &[Bucket], tokens: u64) {
        let mut debits = self.debits.borrow_mut();
        for bucket in buckets.iter().filter(|b| b.unit == Unit::Tokens) {
            let spend = debits.entry(bucket.name.clone()).or_insert_with(|| BucketSpend {
                name: bucket.name.clone(),
                per_minute: bucket.per_minute,
                cost: 0,
            });
            spend.cost = spend.cost.saturating_add(tokens);
        }
    }

    /// Every debit held, as one call to the shared store.
    pub fn take_debits(&self) -> Option<SpendRequest> {
        let debits = std::mem::take(&mut *self.debits.borrow_mut());
        (!debits.is_empty()).then(|| SpendRequest { buckets: debits.into_values().collect(), debit: true })
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

    /// Debits sent that did not land: added back to those held.
    pub fn put_back_debits(&self, sent: SpendRequest) {
        let mut debits = self.debits.borrow_mut();
        for spend in sent.buckets {
            let held = debits.entry(spend.name.clone()).or_insert(BucketSpend { cost: 0, ..spend.clone() });
            held.cost = held.cost.saturating_add(spend.cost);
        }
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
    fn debits_are_summed_per_token_bucket() {
        let outbox = Outbox::default();
        assert_eq!(outbox.take_debits(), None);
        let bucket = |name: &str, unit| Bucket { name: name.into(), unit, per_minute: 60 };
        let buckets = [bucket("r", Unit::Requests), bucket("t", Unit::Tokens), bucket("t.m", Unit::Tokens)];
        outbox.debit(&buckets, 5);
        outbox.debit(&buckets[1..2], 7);
        let sent = outbox.take_debits().unwrap();
        assert!(sent.debit);
        let costs: Vec<(&str, u64)> = sent.buckets.iter().map(|b| (b.name.as_str(), b.cost)).collect();
        assert_eq!(costs, [("t", 12), ("t.m", 5)]);
        assert_eq!(outbox.take_debits(), None);
        // A batch that did not land comes back, added to what came since.
        outbox.debit(&buckets[1..2], 1);
        outbox.put_back_debits(sent);
        let again = outbox.take_debits().unwrap();
        let costs: Vec<(&str, u64)> = again.buckets.iter().map(|b| (b.name.as_str(), b.cost)).collect();
        assert_eq!(costs, [("t", 13), ("t.m", 5)]);
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
