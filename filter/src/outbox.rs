//! Usage records waiting to be sent to ext-proc's admin port, one JSON object
//! per line. Each Envoy worker keeps its own and sends it on its timer, so
//! accounting adds no call to any request.

use modelgate_proto::usage::UsageRecord;
use std::cell::{Cell, RefCell};

/// Records held while ext-proc cannot take them; past this, new ones are dropped and counted.
const MAX_HELD_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct Outbox {
    lines: RefCell<Vec<u8>>,
    dropped: Cell<u64>,
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
