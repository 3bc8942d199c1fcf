//! What an Envoy worker sends to ext-proc's admin port on its timer: usage
//! records, one JSON object per line, then a [`Tally`] line of the requests
//! refused before any backend and the records dropped; and the tokens
//! answers spent from shared rate limits, summed per bucket. Neither adds a
//! call to any request.
//!
//! Each batch of records gets an id when it is first taken, and a batch that
//! did not land is sent again as it was, id, records and tally, so ext-proc can
//! tell a batch it applied but whose answer was lost, and apply it once.

use modelgate_proto::limits::{Bucket, BucketSpend, SpendRequest, Unit};
use modelgate_proto::usage::{Refused, Tally, UsageRecord, OTHER_MODELS};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};

/// Records held while ext-proc cannot take them; past this, new ones are dropped and counted.
const MAX_HELD_BYTES: usize = 8 * 1024 * 1024;

/// Distinct (key, model, status) refusal counts held; past this many, new
/// models are counted as [`OTHER_MODELS`], so a flood of names cannot grow them.
const MAX_REFUSED_GROUPS: usize = 1024;

/// A refusal count's group: key, model, whether the model may be a label, status.
type RefusedGroup = (String, String, bool, u16);

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
    /// Records dropped since the last [`Outbox::take_dropped`], for the log and Envoy's counter.
    dropped: Cell<u64>,
    /// Records dropped and not yet told to ext-proc.
    dropped_untold: Cell<u64>,
    /// Requests refused before any backend, counted by group.
    refused: RefCell<BTreeMap<RefusedGroup, u64>>,
    /// Tokens to debit from shared token buckets, by bucket name.
    debits: RefCell<BTreeMap<String, BucketSpend>>,
}

impl Outbox {
    pub fn push(&self, record: &UsageRecord) {
        if self.held_bytes() >= MAX_HELD_BYTES {
            self.drop_records(1);
            return;
        }
        let mut lines = self.lines.borrow_mut();
        if serde_json::to_writer(&mut *lines, record).is_ok() {
            lines.push(b'\n');
        }
    }

    fn drop_records(&self, records: u64) {
        self.dropped.set(self.dropped.get().saturating_add(records));
        self.dropped_untold.set(self.dropped_untold.get().saturating_add(records));
    }

    /// Counts requests refused before any backend, with the others of their group.
    pub fn refuse(&self, refused: Refused) {
        let mut groups = self.refused.borrow_mut();
        let mut group = (refused.key, refused.model, refused.model_served, refused.status);
        if groups.len() >= MAX_REFUSED_GROUPS && !groups.contains_key(&group) {
            group.1 = OTHER_MODELS.into();
            group.2 = false;
        }
        let count = groups.entry(group).or_default();
        *count = count.saturating_add(refused.count);
    }

    fn held_bytes(&self) -> usize {
        self.lines.borrow().len() + self.unsent.borrow().iter().map(|batch| batch.lines.len()).sum::<usize>()
    }

    /// The next batch to send at `now_ms`: the oldest that did not land, else
    /// everything held (the records, then the tally line if anything was
    /// counted instead) as a new batch whose id is `sender` (unique to this VM)
    /// and its number; `None` when there is nothing. New records wait while
    /// older batches are sent again, one a call.
    pub fn take(&self, sender: &str, now_ms: u64) -> Option<RecordBatch> {
        if let Some(batch) = self.unsent.borrow_mut().pop_front() {
            return Some(batch);
        }
        let mut lines = std::mem::take(&mut *self.lines.borrow_mut());
        let refused = std::mem::take(&mut *self.refused.borrow_mut());
        let tally = Tally {
            at_ms: now_ms,
            refused: refused
                .into_iter()
                .map(|((key, model, model_served, status), count)| Refused { key, model, model_served, status, count })
                .collect(),
            dropped_records: self.dropped_untold.replace(0),
        };
        if (!tally.refused.is_empty() || tally.dropped_records > 0) && serde_json::to_writer(&mut lines, &tally).is_ok()
        {
            lines.push(b'\n');
        }
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

    /// A batch sent that did not land: kept whole for the next try, within the
    /// cap. Past the cap it is dropped whole, tally included: it may have been
    /// applied already, and a part sent again under a new id would count twice.
    pub fn put_back(&self, sent: RecordBatch) {
        if self.held_bytes() + sent.lines.len() > MAX_HELD_BYTES {
            let lines = sent.lines.split(|b| *b == b'\n').filter(|l| !l.is_empty());
            self.drop_records(lines.filter(|l| serde_json::from_slice::<Tally>(l).is_err()).count() as u64);
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

    /// Records dropped since the last call, for the log and Envoy's counter.
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
        records.filter_map(|l| serde_json::from_slice::<UsageRecord>(l).ok()).map(|r| r.request_id).collect()
    }

    #[test]
    fn records_leave_as_json_lines_once() {
        let outbox = Outbox::default();
        assert_eq!(outbox.take("vm", NOW), None);
        let record = UsageRecord { request_id: "r1".into(), status: 200, ..UsageRecord::default() };
        outbox.push(&record);
        outbox.push(&UsageRecord { request_id: "r2".into(), ..record.clone() });
        let sent = outbox.take("vm", NOW).unwrap();
        assert_eq!((sent.id.as_str(), ids(&sent)), ("vm-1", vec!["r1".to_string(), "r2".to_string()]));
        assert_eq!(outbox.take("vm", NOW), None);
    }

    #[test]
    fn a_batch_that_did_not_land_is_sent_again_as_it_was() {
        let outbox = Outbox::default();
        let record = |id: &str| UsageRecord { request_id: id.into(), ..UsageRecord::default() };
        outbox.push(&record("r1"));
        outbox.refuse(refused("k", "", 404));
        let first = outbox.take("vm", NOW).unwrap();
        outbox.push(&record("r2"));
        // Its answer was lost: ext-proc may have applied it, so it goes again with its id, its
        // tally and nothing added, and what came since waits for a batch of its own.
        outbox.put_back(first.clone());
        assert_eq!(outbox.take("vm", NOW + 1), Some(first));
        let second = outbox.take("vm", NOW + 1).unwrap();
        assert_eq!((second.id.as_str(), ids(&second)), ("vm-2", vec!["r2".to_string()]));
        assert_eq!(tally(&second.lines), None);
        assert_eq!(outbox.take("vm", NOW + 1), None);
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
    fn a_full_outbox_drops_counts_and_tells_ext_proc() {
        let outbox = Outbox::default();
        let big = UsageRecord { request_id: "x".repeat(MAX_HELD_BYTES), ..UsageRecord::default() };
        outbox.push(&big);
        outbox.push(&big);
        assert_eq!(outbox.take_dropped(), 1);
        assert_eq!(outbox.take_dropped(), 0);
        let sent = outbox.take("vm", NOW).unwrap();
        assert_eq!(tally(&sent.lines), Some(Tally { at_ms: NOW, refused: Vec::new(), dropped_records: 1 }));
        // A batch that no longer fits is dropped whole when put back, its record counted.
        outbox.put_back(sent);
        assert_eq!(outbox.take_dropped(), 1);
        let next = outbox.take("vm", NOW + 1).unwrap();
        assert_eq!(
            next.lines,
            [
                serde_json::to_vec(&Tally { at_ms: NOW + 1, refused: Vec::new(), dropped_records: 1 }).unwrap(),
                b"\n".to_vec()
            ]
            .concat()
        );
        // Held for another try, a batch still counts against the cap.
        let small = UsageRecord { request_id: "r".into(), ..UsageRecord::default() };
        outbox.push(&small);
        let held = outbox.take("vm", NOW + 2).unwrap();
        outbox.put_back(held.clone());
        outbox.push(&big);
        outbox.push(&small);
        assert_eq!(outbox.take_dropped(), 1);
        assert_eq!(outbox.take("vm", NOW + 3), Some(held));
    }

    const NOW: u64 = 1_700_000_000_000;

    /// The tally line of a batch, if it has one.
    fn tally(batch: &[u8]) -> Option<Tally> {
        batch.split(|b| *b == b'\n').rfind(|l| !l.is_empty()).and_then(|l| serde_json::from_slice(l).ok())
    }

    fn refused(key: &str, model: &str, status: u16) -> Refused {
        Refused { key: key.into(), model: model.into(), model_served: false, status, count: 1 }
    }

    #[test]
    fn refusals_are_counted_per_group_and_told_once_with_the_batch() {
        let outbox = Outbox::default();
        for _ in 0..3 {
            outbox.refuse(refused("k", "", 404));
        }
        outbox.refuse(refused("k", "m", 429));
        let record = UsageRecord { request_id: "r".into(), status: 200, ..UsageRecord::default() };
        outbox.push(&record);
        let sent = outbox.take("vm", NOW).unwrap();
        let lines: Vec<&[u8]> = sent.lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
        assert_eq!(serde_json::from_slice::<UsageRecord>(lines[0]).unwrap(), record);
        let counted = Tally {
            at_ms: NOW,
            refused: vec![Refused { count: 3, ..refused("k", "", 404) }, refused("k", "m", 429)],
            dropped_records: 0,
        };
        assert_eq!((lines.len(), tally(&sent.lines)), (2, Some(counted)));
        assert_eq!(outbox.take("vm", NOW), None, "told once");
    }

    #[test]
    fn a_flood_of_distinct_refused_models_is_counted_in_bounded_groups() {
        let outbox = Outbox::default();
        for i in 0..MAX_REFUSED_GROUPS + 500 {
            outbox.refuse(refused("k", &format!("m-{i}"), 404));
        }
        let counts = tally(&outbox.take("vm", NOW).unwrap().lines).unwrap().refused;
        assert_eq!(counts.len(), MAX_REFUSED_GROUPS + 1);
        assert_eq!(counts.iter().map(|r| r.count).sum::<u64>(), MAX_REFUSED_GROUPS as u64 + 500);
        assert_eq!(counts.iter().find(|r| r.model == OTHER_MODELS).map(|r| r.count), Some(500));
    }
}
