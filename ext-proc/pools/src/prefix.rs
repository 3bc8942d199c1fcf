//! An approximate index of which replica holds which prompt prefix in its KV
//! cache, built from the requests the picker routed: a prompt is cut into
//! blocks, each block's hash chained to the previous one's, and each replica
//! remembers a bounded number of block hashes, least recently used first out.

use foldhash::HashMap;
use std::collections::VecDeque;
use xxhash_rust::xxh3::xxh3_64;

/// The hashes of a prompt's whole blocks, each chained to the one before, so
/// that a block's hash stands for the whole prefix ending with it.
pub fn block_hashes(prompt: &[u8], block_bytes: usize) -> Vec<u64> {
    if block_bytes == 0 {
        return Vec::new();
    }
    let mut previous = 0u64;
    prompt
        .chunks_exact(block_bytes)
        .map(|block| {
            // Seeding xxh3 per block would derive a secret each time; hashing
            // the pair of hashes is a few nanoseconds.
            let mut pair = [0u8; 16];
            pair[..8].copy_from_slice(&previous.to_le_bytes());
            pair[8..].copy_from_slice(&xxh3_64(block).to_le_bytes());
            previous = xxh3_64(&pair);
            previous
        })
        .collect()
}

/// Per replica (by its id in the pool), the block hashes it probably holds.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    replicas: HashMap<u64, Blocks>,
    /// Increases with every block recorded: a block's recency.
    clock: u64,
}

/// One replica's blocks, each with its recency, and in the order they were
/// last used for eviction. A block used again is queued again; its older
/// place in the queue is skipped when reached (its recency no longer matches),
/// which keeps every step O(1) instead of a sorted map's two updates.
#[derive(Debug, Default)]
struct Blocks {
    recency: HashMap<u64, u64>,
    /// (recency, block), oldest first; some entries outdated.
    queue: VecDeque<(u64, u64)>,
}

impl Blocks {
    fn evict_beyond(&mut self, capacity: usize) {
        while self.recency.len() > capacity {
            let Some((recency, block)) = self.queue.pop_front() else { break };
            if self.recency.get(&block) == Some(&recency) {
                self.recency.remove(&block);
            }
        }
        // Outdated entries are dropped once they outnumber the live ones.
        if self.queue.len() > 2 * self.recency.len() + 64 {
            let recency = &self.recency;
            self.queue.retain(|(stamp, block)| recency.get(block) == Some(stamp));
        }
    }
}

impl PrefixIndex {
    /// A replica joins the pool, holding nothing yet.
    pub fn add(&mut self, replica: u64) {
        self.replicas.entry(replica).or_default();
    }

    /// A replica leaves the pool, and what it held with it.
    pub fn remove(&mut self, replica: u64) {
        self.replicas.remove(&replica);
    }

    /// How many of `blocks`, from the first, `replica` holds.
    pub fn matched(&self, replica: u64, blocks: &[u64]) -> usize {
        let Some(held) = self.replicas.get(&replica) else { return 0 };
        blocks.iter().take_while(|b| held.recency.contains_key(b)).count()
    }

    /// Records that `replica` now holds `blocks`, keeping at most `capacity` blocks for it.
    ///
    /// A prompt's later blocks are made older than its earlier ones, as an
    /// engine frees a sequence's blocks from its tail: eviction then shortens
    /// a cached prefix instead of breaking it at its start. A replica that
    /// left (a pick racing its removal) records nothing.
    pub fn insert(&mut self, replica: u64, blocks: &[u64], capacity: usize) {
        let Some(held) = self.replicas.get_mut(&replica) else { return };
        for &block in blocks.iter().rev() {
            self.clock += 1;
            held.recency.insert(block, self.clock);
            held.queue.push_back((self.clock, block));
        }
        held.evict_beyond(capacity);
    }

    /// How many blocks `replica` is thought to hold.
    pub fn len(&self, replica: u64) -> usize {
        self.replicas.get(&replica).map_or(0, |held| held.recency.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_whole_and_chained() {
        assert!(block_hashes(b"abc", 4).is_empty(), "a partial block is not hashed");
        assert!(block_hashes(b"abcd", 0).is_empty());
        let a = block_hashes(b"aaaabbbbcc", 4);
        let b = block_hashes(b"xxxxbbbb", 4);
        assert_eq!(a.len(), 2);
        assert_ne!(a[1], b[1], "the same block after a different prefix is another block");
        assert_eq!(a, block_hashes(b"aaaabbbbcc", 4), "the same prompt hashes the same");
        assert_eq!(block_hashes(b"aaaabbbbzzzz", 4)[..2], a[..]);
    }

    fn index(replicas: u64) -> PrefixIndex {
        let mut index = PrefixIndex::default();
        (0..replicas).for_each(|id| index.add(id));
        index
    }

    #[test]
    fn matched_counts_leading_blocks_held() {
        let mut index = index(2);
        let held = block_hashes(b"sys-prompt-turn1", 4);
        index.insert(0, &held, 100);
        assert_eq!(index.matched(0, &held), 4);
        assert_eq!(index.matched(1, &held), 0, "another replica holds nothing");
        assert_eq!(index.matched(0, &block_hashes(b"sys-prompt-turn2-more", 4)), 3);
        assert_eq!(index.matched(0, &block_hashes(b"other-prompt", 4)), 0);
        assert_eq!(index.matched(7, &held), 0, "an unknown replica holds nothing");
    }

    #[test]
    fn eviction_takes_the_least_recently_used_tail_first() {
        let mut index = index(1);
        let first = block_hashes(b"AAAABBBBCCCC", 4);
        let second = block_hashes(b"DDDDEEEE", 4);
        index.insert(0, &first, 4);
        index.insert(0, &second, 4);
        assert_eq!(index.len(0), 4);
        assert_eq!(index.matched(0, &second), 2, "the newest prompt is whole");
        assert_eq!(index.matched(0, &first), 2, "the older prompt lost its tail, not its start");

        // Using the older prompt again makes it the most recent.
        index.insert(0, &first[..2], 4);
        index.insert(0, &block_hashes(b"FFFF", 4), 4);
        assert_eq!(index.matched(0, &first), 2);
        assert_eq!(index.matched(0, &second), 1, "now the other prompt loses its tail");
    }

    #[test]
    fn blocks_used_again_and_again_keep_the_queue_bounded() {
        let mut index = index(1);
        let blocks = block_hashes(&[7u8; 64], 4);
        for _ in 0..1000 {
            index.insert(0, &blocks, 100);
        }
        assert_eq!(index.matched(0, &blocks), 16);
        assert!(index.replicas[&0].queue.len() <= 2 * 16 + 64 + 16);
    }

    #[test]
    fn a_capacity_of_zero_holds_nothing() {
        let mut index = index(1);
        let blocks = block_hashes(b"AAAABBBB", 4);
        index.insert(0, &blocks, 0);
        assert_eq!((index.len(0), index.matched(0, &blocks)), (0, 0));
    }

    #[test]
    fn a_replica_that_left_holds_and_records_nothing() {
        let mut index = index(2);
        let blocks = block_hashes(b"AAAABBBB", 4);
        index.insert(1, &blocks, 100);
        index.remove(1);
        assert_eq!((index.len(1), index.matched(1, &blocks)), (0, 0));
        index.insert(1, &blocks, 100);
        assert_eq!(index.len(1), 0, "a late pick does not bring it back");
        index.add(1);
        assert_eq!(index.matched(1, &blocks), 0, "back under the same id, it starts empty");
    }
}
