//! A batch's results as they are committed: segments, each a small JSONL
//! object of finished lines, written once under a key of the lease that made
//! it and recorded in the store with the batch's progress in one fenced write
//! ([`crate::store::Meta::save`]). A result counts once its segment is
//! recorded; a segment written by a replica that lost its lease is never
//! recorded, so it never counts. Finalizing reads the recorded segments in
//! order and keeps each line's first result.

use modelgate_proto::batch::OutputLine;
use serde::{Deserialize, Serialize};

/// One finished line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    /// The input line's number, from 1.
    pub line: u64,
    /// It goes to the error file.
    pub failed: bool,
    pub output: OutputLine,
}

/// The key of a lease's `n`th segment of a batch.
pub fn key(batch_id: &str, lease_token: &str, n: u64) -> String {
    let token: String = lease_token.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    format!("batches/{batch_id}/segments/{token}-{n:08}")
}

/// A segment's bytes.
pub fn encode(finished: &[Finished]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for one in finished {
        // A struct of strings, numbers and JSON values always serialises.
        if serde_json::to_writer(&mut bytes, one).is_ok() {
            bytes.push(b'\n');
        }
    }
    bytes
}

/// The set of finished lines: one bit a line, so a batch's worth is small.
#[derive(Debug, Default, Clone)]
pub struct LineSet(Vec<u64>);

impl LineSet {
    /// Adds `line`; false when it was in already.
    pub fn insert(&mut self, line: u64) -> bool {
        let (word, bit) = ((line / 64) as usize, 1u64 << (line % 64));
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        let fresh = self.0[word] & bit == 0;
        self.0[word] |= bit;
        fresh
    }

    pub fn contains(&self, line: u64) -> bool {
        self.0.get((line / 64) as usize).is_some_and(|word| word & (1u64 << (line % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_counted_once() {
        let mut set = LineSet::default();
        assert!(set.insert(1) && set.insert(200) && !set.insert(1));
        assert!(set.contains(200) && !set.contains(2) && !set.contains(100_000));
    }

    #[test]
    fn keys_stay_inside_the_batch() {
        assert_eq!(key("batch_1", "r/1:2", 3), "batches/batch_1/segments/r-1-2-00000003");
    }
}
