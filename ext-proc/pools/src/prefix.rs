//! An approximate index of which replica holds which prompt prefix in its KV
//! cache, built from the requests the picker routed: a prompt is cut into
//! blocks, each block's hash chained to the previous one's, and each replica
//! remembers a bounded number of block hashes, least recently used first out.

/// The hashes of a prompt's whole blocks, each chained to the one before.
pub fn block_hashes(prompt: &[u8], block_bytes: usize) -> Vec<u64> {
    let _ = (prompt, block_bytes);
    Vec::new()
}

/// Per replica (by index in the pool), the block hashes it probably holds.
#[derive(Debug, Default)]
pub struct PrefixIndex {}

impl PrefixIndex {
    pub fn new(replicas: usize) -> Self {
        let _ = replicas;
        PrefixIndex {}
    }

    /// How many of `blocks`, from the first, `replica` holds.
    pub fn matched(&self, replica: usize, blocks: &[u64]) -> usize {
        let _ = (replica, blocks);
        0
    }

    /// Records that `replica` now holds `blocks`, keeping at most `capacity` blocks for it.
    pub fn insert(&mut self, replica: usize, blocks: &[u64], capacity: usize) {
        let _ = (replica, blocks, capacity);
    }
}
