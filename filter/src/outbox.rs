//! What an Envoy worker sends to ext-proc's admin port on its timer: usage
//! records, one JSON object per line, and the tokens answers spent from
//! shared rate limits, summed per bucket. Neither adds a call to any request.
//!
//! Each batch of records gets an id when it is first taken, and a batch that
//! did not land is sent again as it was, id and records, so ext-proc can
//! tell a batch it applied but whose answer was lost, and apply it once.

use modelgate_proto::limits::{Bucket, BucketSpend, SpendRequest, Unit};
use modelgate_proto::usage::UsageRecord;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};

/// Records held while ext-proc cannot take them; past this, new ones are dropped and counted.
const MAX_HELD_BYTES: usize = 8 * 1024 * 1024;

/// Usage records to send in one call, under an id no other batch has.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordBatch {
    pub id: String,
    pub lines: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct Outbox {
    /// Records not yet in a batch.
    lines: RefCell<Vec<u8>>,
    /// Batches sent that did not land, oldest first.
    unsent: RefCell<VecDeque<RecordBatch>>,
    /// Batches made so far: the last part of their ids.
    batches: Cell<u64>,
    dropped: Cell<u64>,
    /// Tokens to debit from shared token buckets, by bucket name.
    debits: RefCell<BTreeMap<String, BucketSpend>>,
}

impl Outbox {
    pub fn push(&self, record: &UsageRecord) {
        if self.held_bytes() >= MAX_HELD_BYTES {
            self.dropped.set(self.dropped.get() + 1);
            return;
        }
        let mut lines = self.lines.borrow_mut();
        if serde_json::to_writer(&mut *lines, record).is_ok() {
            lines.push(b'\n');
        }
    }

    fn held_bytes(&self) -> usize {
        self.lines.borrow().len() + self.unsent.borrow().iter().map(|batch| batch.lines.len()).sum::<usize>()
    }

    /// The next batch to send: the oldest that did not land, else the records
    /// held, as a new batch whose id is `sender` (unique to this VM) and its
    /// number; `None` when there is nothing. New records wait while older
    /// batches are sent again, one a call.
    pub fn take(&self, sender: &str) -> Option<RecordBatch> {
        if let Some(batch) = self.unsent.borrow_mut().pop_front() {
            return Some(batch);
        }
        let lines = std::mem::take(&mut *self.lines.borrow_mut());
        if lines.is_empty() {
            return None;
        }
        self.batches.set(self.batches.get() + 1);
        Some(RecordBatch { id: format!("{sender}-{}", self.batches.get()), lines })
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

    /// A batch sent that did not land: kept whole for the next try, within the cap.
    pub fn put_back(&self, sent: RecordBatch) {
        if self.held_bytes() + sent.lines.len() > MAX_HELD_BYTES {
            let records = sent.lines.iter().filter(|b| **b == b'\n').count() as u64;
            self.dropped.set(self.dropped.get() + records);
            return;
        }
        self.unsent.borrow_mut().push_back(sent);
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

/// What becomes of a batch, by the status of ext-proc's answer (empty when none came).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Taken,
    /// Not taken, or not known to be: sent again, as it was.
    Retry,
    /// Refused for what it is: sent again it would be refused again, and hold up the batches after it.
    Refused,
}

pub fn delivery(status: &[u8]) -> Delivery {
    match status {
        [b'2', ..] => Delivery::Taken,
        b"408" | b"429" => Delivery::Retry,
        [b'4', ..] => Delivery::Refused,
        _ => Delivery::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(batch: &RecordBatch) -> Vec<String> {
        let records = batch.lines.split(|b| *b == b'\n').filter(|l| !l.is_empty());
        records.map(|l| serde_json::from_slice::<UsageRecord>(l).unwrap().request_id).collect()
    }

    #[test]
    fn records_leave_as_json_lines_once() {
        let outbox = Outbox::default();
        assert_eq!(outbox.take("vm"), None);
        let record = UsageRecord { request_id: "r1".into(), status: 200, ..UsageRecord::default() };
        outbox.push(&record);
        outbox.push(&UsageRecord { request_id: "r2".into(), ..record.clone() });
        let sent = outbox.take("vm").unwrap();
        assert_eq!((sent.id.as_str(), ids(&sent)), ("vm-1", vec!["r1".to_string(), "r2".to_string()]));
        assert_eq!(outbox.take("vm"), None);
    }

    #[test]
    fn a_batch_that_did_not_land_is_sent_again_as_it_was() {
        let outbox = Outbox::default();
        let record = |id: &str| UsageRecord { request_id: id.into(), ..UsageRecord::default() };
        outbox.push(&record("r1"));
        let first = outbox.take("vm").unwrap();
        outbox.push(&record("r2"));
        // Its answer was lost: ext-proc may have applied it, so it goes again with its id and
        // nothing added, and the records since wait for a batch of their own.
        outbox.put_back(first.clone());
        assert_eq!(outbox.take("vm"), Some(first));
        let second = outbox.take("vm").unwrap();
        assert_eq!((second.id.as_str(), ids(&second)), ("vm-2", vec!["r2".to_string()]));
        assert_eq!(outbox.take("vm"), None);
    }

    #[test]
    fn only_a_refused_batch_is_given_up() {
        assert_eq!(delivery(b"200"), Delivery::Taken);
        for status in [&b""[..], b"503", b"504", b"500", b"408", b"429"] {
            assert_eq!(delivery(status), Delivery::Retry, "{status:?}");
        }
        assert_eq!(delivery(b"400"), Delivery::Refused);
        assert_eq!(delivery(b"413"), Delivery::Refused);
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
        // Held for another try, a batch still counts against the cap.
        let sent = outbox.take("vm").unwrap();
        outbox.put_back(sent);
        outbox.push(&big);
        assert_eq!(outbox.take_dropped(), 1);
    }
}
