//! One simulated inference engine per process, so that which replica a
//! request lands on has the consequences it has on vLLM: a KV cache of
//! blocks with prefix caching (cached blocks skip prefill; blocks of finished
//! requests stay until evicted least-recently-used), at most `max_num_seqs`
//! sequences running with the rest waiting first-in first-out, and decoding
//! that slows as the batch grows.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

/// The engine's shape and speed, from the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub kv_cache_tokens: u64,
    pub block_size: u32,
    pub max_num_seqs: usize,
    pub prefill_us_per_token: u64,
    pub decode_slowdown: f64,
}

/// What one request asks of the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Work {
    /// The `model_name` label: the base model, also for an adapter's requests (as vLLM labels them).
    pub model: String,
    /// The LoRA adapter the request runs with, if any.
    pub adapter: Option<String>,
    pub prompt: Vec<u32>,
    /// Tokens the request may generate, for which it holds KV blocks too.
    pub max_output: u32,
}

/// What the engine holds for one running request.
#[derive(Debug)]
struct Grant {
    model: String,
    adapter: Option<String>,
    /// Hashes of the prompt's full blocks, first to last.
    blocks: Vec<u64>,
    /// Blocks not shared with anyone: a partial last prompt block and the output's.
    private: usize,
    uncached_tokens: u32,
}

/// A request admitted to run; its blocks and its place in the batch are
/// given back when it is dropped, whether it finished or its client left.
#[derive(Debug)]
pub struct Running {
    engine: Arc<Engine>,
    grant: Option<Grant>,
}

struct Waiter {
    work: Work,
    admitted: oneshot::Sender<Running>,
}

/// The engine's counts, as its metrics show them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    /// Running and waiting requests per model label; labels stay once seen.
    pub models: BTreeMap<String, (u64, u64)>,
    pub running_adapters: Vec<String>,
    pub waiting_adapters: Vec<String>,
    pub kv_cache_usage: f64,
    pub num_blocks: usize,
    pub block_size: u32,
}

pub struct Engine {
    config: EngineConfig,
    state: Mutex<State>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("config", &self.config).finish_non_exhaustive()
    }
}

struct State {
    cache: BlockCache,
    running: usize,
    running_by_model: BTreeMap<String, u64>,
    running_adapters: BTreeMap<String, u64>,
    waiting: VecDeque<Waiter>,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Arc<Engine> {
        let blocks = (config.kv_cache_tokens / u64::from(config.block_size.max(1))).max(1);
        let cache = BlockCache::new(usize::try_from(blocks).unwrap_or(usize::MAX));
        let state = State {
            cache,
            running: 0,
            running_by_model: BTreeMap::new(),
            running_adapters: BTreeMap::new(),
            waiting: VecDeque::new(),
        };
        Arc::new(Engine { config, state: Mutex::new(state) })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `work` may run (its turn in the queue, a free sequence
    /// slot and room in the KV cache), and holds its place until dropped.
    pub async fn start(self: &Arc<Self>, work: Work) -> Running {
        let admitted = {
            let mut state = self.lock();
            if state.waiting.is_empty() && self.fits(&state, &work) {
                let grant = self.admit(&mut state, work);
                return Running { engine: self.clone(), grant: Some(grant) };
            }
            let (admitted, wait) = oneshot::channel();
            state.waiting.push_back(Waiter { work, admitted });
            wait
        };
        // Only `release` pops waiters, and it answers every one it pops.
        admitted.await.expect("every waiter is answered")
    }

    /// The time from now to the first token, given the base time to first token.
    pub fn prefill(&self, running: &Running, ttft: Duration) -> Duration {
        let uncached = running.grant.as_ref().map_or(0, |g| u64::from(g.uncached_tokens));
        ttft + Duration::from_micros(self.config.prefill_us_per_token.saturating_mul(uncached))
    }

    /// The time between tokens now, given the time for a batch of one.
    pub fn inter_token(&self, itl: Duration) -> Duration {
        let others = self.lock().running.saturating_sub(1) as f64;
        // saturates rather than panics on absurd settings
        Duration::try_from_secs_f64(itl.as_secs_f64() * (1.0 + self.config.decode_slowdown * others))
            .unwrap_or(Duration::MAX)
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        let mut models: BTreeMap<String, (u64, u64)> =
            state.running_by_model.iter().map(|(model, n)| (model.clone(), (*n, 0))).collect();
        let mut waiting_adapters = Vec::new();
        for waiter in state.waiting.iter().filter(|w| !w.admitted.is_closed()) {
            models.entry(waiter.work.model.clone()).or_default().1 += 1;
            waiting_adapters.extend(waiter.work.adapter.clone());
        }
        waiting_adapters.sort();
        waiting_adapters.dedup();
        Snapshot {
            models,
            running_adapters: state.running_adapters.keys().cloned().collect(),
            waiting_adapters,
            kv_cache_usage: state.cache.usage(),
            num_blocks: state.cache.capacity,
            block_size: self.config.block_size,
        }
    }

    /// Hashes of `prompt`'s full blocks, each chained from the one before,
    /// so equal hashes mean equal prefixes.
    fn block_hashes(&self, prompt: &[u32]) -> Vec<u64> {
        let mut parent = 0;
        prompt
            .chunks_exact(self.config.block_size.max(1) as usize)
            .map(|block| {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                (parent, block).hash(&mut hasher);
                parent = hasher.finish();
                parent
            })
            .collect()
    }

    fn private_blocks(&self, work: &Work) -> usize {
        let block = self.config.block_size.max(1) as usize;
        let partial = usize::from(!work.prompt.len().is_multiple_of(block));
        partial + (work.max_output as usize).div_ceil(block)
    }

    /// A request too big for the whole cache still runs when it runs alone, as nothing could make room for it.
    fn fits(&self, state: &State, work: &Work) -> bool {
        state.running < self.config.max_num_seqs.max(1)
            && (state.running == 0 || state.cache.fits(&self.block_hashes(&work.prompt), self.private_blocks(work)))
    }

    fn admit(&self, state: &mut State, work: Work) -> Grant {
        let blocks = self.block_hashes(&work.prompt);
        let private = self.private_blocks(&work);
        let cached_blocks = state.cache.cached_prefix(&blocks);
        // vLLM computes a fully cached prompt's last token again, to have logits to sample from.
        let cached_tokens = (cached_blocks * self.config.block_size as usize).min(work.prompt.len().saturating_sub(1));
        state.cache.hold(&blocks, private);
        state.running += 1;
        *state.running_by_model.entry(work.model.clone()).or_default() += 1;
        if let Some(adapter) = &work.adapter {
            *state.running_adapters.entry(adapter.clone()).or_default() += 1;
        }
        Grant {
            model: work.model,
            adapter: work.adapter,
            blocks,
            private,
            uncached_tokens: (work.prompt.len() - cached_tokens) as u32,
        }
    }

    fn release(self: &Arc<Self>, grant: Grant) {
        let mut abandoned = Vec::new();
        {
            let mut state = self.lock();
            state.cache.release(&grant.blocks, grant.private);
            state.running -= 1;
            if let Some(n) = state.running_by_model.get_mut(&grant.model) {
                *n -= 1;
            }
            if let Some(adapter) = &grant.adapter {
                if let Some(n) = state.running_adapters.get_mut(adapter) {
                    *n -= 1;
                    if *n == 0 {
                        state.running_adapters.remove(adapter);
                    }
                }
            }
            while let Some(waiter) = state.waiting.front() {
                if waiter.admitted.is_closed() {
                    state.waiting.pop_front();
                } else if self.fits(&state, &waiter.work) {
                    let Some(waiter) = state.waiting.pop_front() else { break };
                    let grant = self.admit(&mut state, waiter.work);
                    let running = Running { engine: self.clone(), grant: Some(grant) };
                    // A waiter that left in the meantime gives its place back, once the lock is released.
                    if let Err(running) = waiter.admitted.send(running) {
                        abandoned.push(running);
                    }
                } else {
                    break;
                }
            }
        }
        drop(abandoned);
    }
}

impl Running {
    /// Prompt tokens found in the prefix cache.
    pub fn cached_tokens(&self, prompt_tokens: u32) -> u32 {
        prompt_tokens - self.grant.as_ref().map_or(prompt_tokens, |g| g.uncached_tokens)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(grant) = self.grant.take() {
            self.engine.release(grant);
        }
    }
}

/// The KV cache's blocks: those of the prompts' full blocks are shared by
/// hash and stay after their requests finish, until evicted LRU.
#[derive(Debug)]
struct BlockCache {
    capacity: usize,
    /// Reference counts of the blocks held by hash.
    shared: HashMap<u64, u32>,
    /// Blocks no request holds, by when they were last used: the eviction order.
    idle: BTreeMap<u64, u64>,
    idle_since: HashMap<u64, u64>,
    private: usize,
    clock: u64,
}

impl BlockCache {
    fn new(capacity: usize) -> BlockCache {
        BlockCache {
            capacity,
            shared: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: HashMap::new(),
            private: 0,
            clock: 0,
        }
    }

    fn used(&self) -> usize {
        self.shared.len() + self.private
    }

    fn usage(&self) -> f64 {
        (self.used() as f64 / self.capacity as f64).min(1.0)
    }

    fn cached_prefix(&self, blocks: &[u64]) -> usize {
        blocks.iter().take_while(|hash| self.shared.contains_key(hash)).count()
    }

    fn fits(&self, blocks: &[u64], private: usize) -> bool {
        let new = blocks.iter().filter(|hash| !self.shared.contains_key(hash)).count();
        let reused_idle = blocks.iter().filter(|hash| self.idle_since.contains_key(hash)).count();
        let room = self.capacity.saturating_sub(self.used()) + self.idle.len().saturating_sub(reused_idle);
        new + private <= room
    }

    fn hold(&mut self, blocks: &[u64], private: usize) {
        for hash in blocks {
            if let Some(since) = self.idle_since.remove(hash) {
                self.idle.remove(&since);
            }
            if let Some(refs) = self.shared.get_mut(hash) {
                *refs += 1;
            } else {
                self.make_room(1);
                self.shared.insert(*hash, 1);
            }
        }
        self.make_room(private);
        self.private += private;
    }

    /// Evicts least-recently-used idle blocks until `blocks` more fit, or none is idle.
    fn make_room(&mut self, blocks: usize) {
        while self.used() + blocks > self.capacity {
            let Some((_, hash)) = self.idle.pop_first() else { return };
            self.idle_since.remove(&hash);
            self.shared.remove(&hash);
        }
    }

    /// Gives blocks back; the last block is marked used first, so a prompt's
    /// tail is evicted before its head, which more requests share.
    fn release(&mut self, blocks: &[u64], private: usize) {
        for hash in blocks.iter().rev() {
            if let Some(refs) = self.shared.get_mut(hash) {
                *refs -= 1;
                if *refs == 0 {
                    self.clock += 1;
                    self.idle.insert(self.clock, *hash);
                    self.idle_since.insert(*hash, self.clock);
                }
            }
        }
        self.private -= private;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(kv_cache_tokens: u64, max_num_seqs: usize, decode_slowdown: f64) -> Arc<Engine> {
        Engine::new(EngineConfig {
            kv_cache_tokens,
            block_size: 4,
            max_num_seqs,
            prefill_us_per_token: 1000,
            decode_slowdown,
        })
    }

    fn work(prompt: &[u32]) -> Work {
        Work { model: "m".into(), adapter: None, prompt: prompt.to_vec(), max_output: 0 }
    }

    #[tokio::test]
    async fn a_shared_prefix_is_cached_by_block() {
        let engine = engine(1024, 8, 0.0);
        let first = engine.start(work(&[1, 2, 3, 4, 5, 6, 7, 8, 9])).await;
        assert_eq!(first.cached_tokens(9), 0);
        assert_eq!(engine.prefill(&first, Duration::from_millis(2)), Duration::from_millis(2 + 9));
        drop(first);
        let same_head = engine.start(work(&[1, 2, 3, 4, 5, 6, 7, 8, 10, 11])).await;
        assert_eq!(same_head.cached_tokens(10), 8, "the two full blocks stay after the first request finished");
        assert_eq!(engine.prefill(&same_head, Duration::ZERO), Duration::from_millis(2));
        let other_head = engine.start(work(&[9, 2, 3, 4, 5, 6, 7, 8])).await;
        assert_eq!(
            other_head.cached_tokens(8),
            0,
            "blocks are chained: the same second block after another first is a miss"
        );
        let whole = engine.start(work(&[1, 2, 3, 4, 5, 6, 7, 8])).await;
        assert_eq!(whole.cached_tokens(8), 7, "a fully cached prompt computes its last token again");
    }

    #[tokio::test]
    async fn idle_blocks_are_evicted_least_recently_used() {
        let engine = engine(16, 8, 0.0); // four blocks of four tokens
        drop(engine.start(work(&[1, 1, 1, 1, 1, 1, 1, 1])).await);
        drop(engine.start(work(&[2, 2, 2, 2, 2, 2, 2, 2])).await);
        drop(engine.start(work(&[1, 1, 1, 1, 1, 1, 1, 1])).await); // the first prompt, used again
        assert_eq!(engine.snapshot().kv_cache_usage, 1.0, "finished requests' blocks stay cached");
        // two new blocks evict the two used longest ago: the second prompt's
        drop(engine.start(work(&[3, 3, 3, 3, 3, 3, 3, 3])).await);
        assert_eq!(engine.start(work(&[1, 1, 1, 1, 1, 1, 1, 1, 0])).await.cached_tokens(9), 8);
        assert_eq!(engine.start(work(&[2, 2, 2, 2, 0])).await.cached_tokens(5), 0);
    }

    #[tokio::test]
    async fn blocks_of_running_requests_are_not_evicted() {
        let engine = engine(16, 8, 0.0);
        let holder = engine.start(work(&[1, 1, 1, 1, 1, 1, 1, 1])).await;
        let _second = engine.start(work(&[2, 2, 2, 2, 2, 2, 2, 2])).await;
        let third = tokio::spawn({
            let engine = engine.clone();
            async move { engine.start(work(&[3, 3, 3, 3])).await.cached_tokens(4) }
        });
        tokio::task::yield_now().await;
        assert_eq!(engine.snapshot().models["m"], (2, 1), "no room in the cache: it waits");
        drop(holder);
        assert_eq!(third.await.unwrap(), 0);
        assert_eq!(engine.start(work(&[2, 2, 2, 2, 2, 2, 2, 2])).await.cached_tokens(8), 7);
    }

    #[tokio::test]
    async fn requests_past_max_num_seqs_wait_in_order() {
        let engine = engine(1 << 20, 2, 0.0);
        let a = engine.start(work(&[1])).await;
        let b = engine.start(work(&[2])).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for n in [3, 4] {
            let (engine, tx) = (engine.clone(), tx.clone());
            tokio::spawn(async move {
                let running = engine.start(work(&[n])).await;
                tx.send(n).unwrap();
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(running);
            });
            tokio::task::yield_now().await;
        }
        assert_eq!(engine.snapshot().models["m"], (2, 2));
        drop(a);
        assert_eq!(rx.recv().await, Some(3), "first in, first out");
        assert_eq!(engine.snapshot().models["m"], (2, 1));
        drop(b);
        assert_eq!(rx.recv().await, Some(4));
        assert_eq!(engine.snapshot().models["m"], (2, 0));
    }

    #[tokio::test]
    async fn a_waiter_that_leaves_gives_its_place_up() {
        let engine = engine(1 << 20, 1, 0.0);
        let a = engine.start(work(&[1])).await;
        let gone = tokio::spawn({
            let engine = engine.clone();
            async move { engine.start(work(&[2])).await }
        });
        tokio::task::yield_now().await;
        gone.abort();
        let _ = gone.await;
        assert_eq!(engine.snapshot().models["m"], (1, 0));
        drop(a);
        let _b = engine.start(work(&[3])).await;
        assert_eq!(engine.snapshot().models["m"], (1, 0));
    }

    #[tokio::test]
    async fn decoding_slows_as_the_batch_grows() {
        let engine = engine(1 << 20, 8, 0.5);
        let itl = Duration::from_millis(10);
        let a = engine.start(work(&[1])).await;
        assert_eq!(engine.inter_token(itl), itl);
        let _b = engine.start(work(&[2])).await;
        let _c = engine.start(work(&[3])).await;
        assert_eq!(engine.inter_token(itl), Duration::from_millis(20));
        drop(a);
        assert_eq!(engine.inter_token(itl), Duration::from_millis(15));
    }

    #[tokio::test]
    async fn adapters_show_while_their_requests_run_or_wait() {
        let engine = engine(1 << 20, 1, 0.0);
        let with = |adapter: &str, n| Work { adapter: Some(adapter.into()), ..work(&[n]) };
        let a = engine.start(with("sql", 1)).await;
        let waiting = tokio::spawn({
            let engine = engine.clone();
            async move { drop(engine.start(with("chat", 2)).await) }
        });
        tokio::task::yield_now().await;
        let snapshot = engine.snapshot();
        assert_eq!((snapshot.running_adapters, snapshot.waiting_adapters), (vec!["sql".into()], vec!["chat".into()]));
        drop(a);
        waiting.await.unwrap();
        let snapshot = engine.snapshot();
        assert!(snapshot.running_adapters.is_empty() && snapshot.waiting_adapters.is_empty());
    }
}
