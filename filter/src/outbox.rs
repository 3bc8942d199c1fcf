//! What an Envoy worker sends to ext-proc's admin port on its timer: usage
//! records, one JSON object per line, then a [`Tally`] line of the requests
//! refused before any backend and the records dropped; and the settlements
//! of shared token reservations, summed per bucket. Neither adds a call to
//! any request.
//!
//! Each batch of records gets an id when it is first taken, and a batch that
//! did not land is sent again as it was, id, records and tally, so ext-proc can
//! tell a batch it applied but whose answer was lost, and apply it once.

use modelgate_proto::limits::{BucketSpend, Reserved, SpendRequest};
use modelgate_proto::usage::{Refused, Tally, Traffic, UsageRecord, OTHER_MODELS};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};

/// Records held while ext-proc cannot take them; past this, new ones are dropped and counted.
const MAX_HELD_BYTES: usize = 8 * 1024 * 1024;

/// About what a usage record of a whole answer takes as a JSON line.
const RECORD_BYTES: usize = 384;

/// Distinct (key, model, status) refusal counts held; past this many, new
/// models are counted as [`OTHER_MODELS`], so a flood of names cannot grow them.
const MAX_REFUSED_GROUPS: usize = 1024;

/// Budget reservations held to release; past this many, a release is not
/// sent, and its reservation (if made) stays reserved until its period ends.
const MAX_RELEASES: usize = 65_536;

/// A refusal count's group: key, model, whether the model may be a label, status.
type RefusedGroup = (String, String, bool, u16, Traffic);

/// Usage records to send in one call, under an id no other batch has.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordBatch {
    pub id: String,
    pub lines: Vec<u8>,
    /// When it was made, in milliseconds since the Unix epoch.
    pub made_ms: u64,
}

/// How long a batch that did not land is sent again before it is dropped
/// (and counted): well inside the time ext-proc remembers the ids it applied
/// (`--usage-dedup-minutes`, an hour by default), so a batch applied whose
/// answer was lost is never applied twice.
pub const RECORD_RETRY_MS: u64 = 30 * 60_000;

#[derive(Debug, Default)]
pub struct Outbox {
    /// Records not yet in a batch.
    lines: RefCell<Vec<u8>>,
    /// Batches sent that did not land, oldest first.
    unsent: RefCell<VecDeque<RecordBatch>>,
    /// Batches of records or debits made so far: the last part of their ids.
    batches: Cell<u64>,
    /// Records dropped since the last [`Outbox::take_dropped`], for the log and Envoy's counter.
    dropped: Cell<u64>,
    /// Records dropped and not yet told to ext-proc.
    dropped_untold: Cell<u64>,
    /// Requests refused before any backend, counted by group.
    refused: RefCell<BTreeMap<RefusedGroup, u64>>,
    /// Budget reservations to release with the next batch ([`Tally::released_reservations`]).
    releases: RefCell<Vec<String>>,
    /// Tokens to settle in shared token buckets, by bucket name: the bucket's
    /// limit, and the tokens to charge (or, below zero, to give back).
    settlements: RefCell<BTreeMap<String, (u64, i64)>>,
    /// Debits sent whose outcome is unknown: sent again as they were, with
    /// their id, so that the store applies each once.
    unconfirmed: RefCell<VecDeque<Debits>>,
    /// Debits dropped since the last look: unconfirmed for longer than the store remembers their ids.
    dropped_debits: Cell<u64>,
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
        if self.held_bytes() >= MAX_HELD_BYTES {
            self.drop_records(1);
            return;
        }
        let mut lines = self.lines.borrow_mut();
        // Room for a usual record at once, rather than growing as it is written.
        lines.reserve(RECORD_BYTES);
        record.write_json(&mut lines);
        lines.push(b'\n');
    }

    fn drop_records(&self, records: u64) {
        self.dropped.set(self.dropped.get().saturating_add(records));
        self.dropped_untold.set(self.dropped_untold.get().saturating_add(records));
    }

    /// Counts requests refused before any backend, with the others of their group.
    pub fn refuse(&self, refused: Refused) {
        let mut groups = self.refused.borrow_mut();
        let mut group = (refused.key, refused.model, refused.model_served, refused.status, refused.traffic);
        if groups.len() >= MAX_REFUSED_GROUPS && !groups.contains_key(&group) {
            group.1 = OTHER_MODELS.into();
            group.2 = false;
        }
        let count = groups.entry(group).or_default();
        *count = count.saturating_add(refused.count);
    }

    /// Releases a budget reservation no usage record will settle, with the next batch.
    pub fn release(&self, reservation: String) {
        let mut releases = self.releases.borrow_mut();
        if releases.len() < MAX_RELEASES {
            releases.push(reservation);
        }
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
        loop {
            let Some(batch) = self.unsent.borrow_mut().pop_front() else { break };
            if now_ms.saturating_sub(batch.made_ms) < RECORD_RETRY_MS {
                return Some(batch);
            }
            self.give_up(&batch);
        }
        let mut lines = std::mem::take(&mut *self.lines.borrow_mut());
        let refused = std::mem::take(&mut *self.refused.borrow_mut());
        let tally = Tally {
            at_ms: now_ms,
            refused: refused
                .into_iter()
                .map(|((key, model, model_served, status, traffic), count)| Refused {
                    key,
                    model,
                    model_served,
                    status,
                    count,
                    traffic,
                })
                .collect(),
            dropped_records: self.dropped_untold.replace(0),
            released_reservations: std::mem::take(&mut *self.releases.borrow_mut()),
        };
        let nothing = Tally { at_ms: now_ms, ..Tally::default() };
        if tally != nothing && serde_json::to_writer(&mut lines, &tally).is_ok() {
            lines.push(b'\n');
        }
        if lines.is_empty() {
            return None;
        }
        Some(RecordBatch { id: self.next_batch_id(sender), lines, made_ms: now_ms })
    }

    /// A new batch id: `sender` (unique to this VM) and the batch's number.
    fn next_batch_id(&self, sender: &str) -> String {
        self.batches.set(self.batches.get() + 1);
        format!("{sender}-{}", self.batches.get())
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
    /// they were, and every settlement held since, as a new batch whose id
    /// is made as a batch of records' is.
    pub fn take_debits(&self, sender: &str, now_us: u64) -> Vec<Debits> {
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
            let request = SpendRequest { buckets, debit: true, id: Some(self.next_batch_id(sender)) };
            batches.push(Debits { request, first_sent_us: now_us });
        }
        batches
    }

    /// A batch sent that did not land: kept whole for the next try, within the
    /// cap. Past the cap it is dropped whole, tally included: it may have been
    /// applied already, and a part sent again under a new id would count twice.
    pub fn put_back(&self, sent: RecordBatch) {
        if self.held_bytes() + sent.lines.len() > MAX_HELD_BYTES {
            self.give_up(&sent);
            return;
        }
        self.unsent.borrow_mut().push_back(sent);
    }

    /// A batch that will not be sent again: its records are counted as dropped.
    pub fn give_up(&self, batch: &RecordBatch) {
        let lines = batch.lines.split(|b| *b == b'\n').filter(|l| !l.is_empty());
        self.drop_records(lines.filter(|l| serde_json::from_slice::<Tally>(l).is_err()).count() as u64);
    }

    /// Debits that will not be sent again, counted with those dropped.
    pub fn give_up_debits(&self) {
        self.dropped_debits.set(self.dropped_debits.get() + 1);
    }

    /// Debits sent whose outcome is unknown (no answer, or an error): sent again with the next batch.
    pub fn put_back_debits(&self, sent: Debits) {
        self.unconfirmed.borrow_mut().push_back(sent);
    }

    /// Debits dropped since the last call, for the log.
    pub fn take_dropped_debits(&self) -> u64 {
        self.dropped_debits.replace(0)
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
        // 401 and 403: the internal tokens disagree, which the operators can mend (a rotation).
        b"401" | b"403" | b"408" | b"429" => Delivery::Retry,
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
    fn a_batch_is_sent_again_only_while_ext_proc_remembers_its_id() {
        let outbox = Outbox::default();
        outbox.push(&UsageRecord { request_id: "r".into(), ..UsageRecord::default() });
        let sent = outbox.take("vm", NOW).unwrap();
        outbox.put_back(sent.clone());
        assert_eq!(outbox.take("vm", NOW + RECORD_RETRY_MS - 1), Some(sent.clone()));
        outbox.put_back(sent);
        // Past that it is dropped, and only the count of its records goes on.
        let told = outbox.take("vm", NOW + RECORD_RETRY_MS).unwrap();
        assert_eq!((ids(&told), tally(&told.lines).map(|t| t.dropped_records)), (vec![], Some(1)));
        assert_eq!(outbox.take_dropped(), 1);
    }

    #[test]
    fn only_a_refused_batch_is_given_up() {
        assert_eq!(delivery(b"200"), Delivery::Taken);
        for status in [&b""[..], b"503", b"504", b"500", b"408", b"429", b"401", b"403"] {
            assert_eq!(delivery(status), Delivery::Retry, "{status:?}");
        }
        assert_eq!(delivery(b"400"), Delivery::Refused);
        assert_eq!(delivery(b"413"), Delivery::Refused);
    }

    #[test]
    fn settlements_are_summed_per_token_bucket_and_a_lost_batch_is_sent_again_as_it_was() {
        let outbox = Outbox::default();
        assert_eq!(outbox.take_debits("vm", 0), []);
        let held =
            |bucket: &str, tokens| Reserved { bucket: bucket.into(), per_minute: 60, tokens, until_us: 60_000_000 };
        // 20 reserved in the key's bucket and the model's; 5 used; a second answer over its 10 by 7.
        outbox.settle(&[held("t", 20), held("t.m", 20)], Some(5), 0);
        outbox.settle(&[held("t", 10)], Some(17), 0);
        outbox.settle(&[held("t", 10)], None, 0);
        let first = outbox.take_debits("vm", 1_000);
        assert_eq!(first.len(), 1);
        let sent = &first[0].request;
        assert!(sent.debit);
        let nets: Vec<(&str, u64, u64)> = sent.buckets.iter().map(|b| (b.name.as_str(), b.cost, b.refund)).collect();
        assert_eq!(nets, [("t", 0, 8), ("t.m", 0, 15)]);
        assert_eq!(outbox.take_debits("vm", 2_000), []);
        // A batch whose answer was lost goes again with its id, apart from what came since.
        outbox.put_back_debits(first[0].clone());
        outbox.settle(&[held("t", 0)], Some(3), 0);
        let again = outbox.take_debits("vm", 3_000);
        assert_eq!(again.len(), 2);
        assert_eq!(again[0], first[0]);
        assert_ne!(again[1].request.id, first[0].request.id);
        assert_eq!((again[1].request.buckets[0].cost, again[1].first_sent_us), (3, 3_000));
        // Past the retry window, a batch is dropped and counted.
        outbox.put_back_debits(first[0].clone());
        assert_eq!(outbox.take_debits("vm", 1_000 + DEBIT_RETRY_US), []);
        assert_eq!(outbox.take_dropped_debits(), 1);
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
        assert_eq!(
            tally(&sent.lines),
            Some(Tally { at_ms: NOW, refused: Vec::new(), dropped_records: 1, ..Tally::default() })
        );
        // A batch that no longer fits is dropped whole when put back, its record counted.
        outbox.put_back(sent);
        assert_eq!(outbox.take_dropped(), 1);
        let next = outbox.take("vm", NOW + 1).unwrap();
        assert_eq!(
            next.lines,
            [
                serde_json::to_vec(&Tally {
                    at_ms: NOW + 1,
                    refused: Vec::new(),
                    dropped_records: 1,
                    ..Tally::default()
                })
                .unwrap(),
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
        Refused { key: key.into(), model: model.into(), status, count: 1, ..Refused::default() }
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
            ..Tally::default()
        };
        assert_eq!((lines.len(), tally(&sent.lines)), (2, Some(counted)));
        assert_eq!(outbox.take("vm", NOW), None, "told once");
    }

    #[test]
    fn reservations_no_record_settles_are_released_with_the_next_batch_once() {
        let outbox = Outbox::default();
        outbox.release("r1".into());
        outbox.release("r2".into());
        let sent = outbox.take("vm", NOW).unwrap();
        let released = tally(&sent.lines).unwrap().released_reservations;
        assert_eq!(released, ["r1", "r2"]);
        assert_eq!(outbox.take("vm", NOW), None, "released once");
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
