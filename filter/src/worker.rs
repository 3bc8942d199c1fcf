//! What an Envoy worker's root context does, over any [`Host`]: reads the
//! configuration, makes each request's [`Flow`], and on its timer sends the
//! usage records and shared token settlements its requests left in the
//! [`Outbox`] to ext-proc's admin port.

use crate::flow::Flow;
use crate::gate::LocalCopy;
use crate::host::Host;
use crate::outbox::{self, Delivery, Outbox, RecordBatch};
use modelgate_proto::headers;
use modelgate_proto::routing::Router;

use modelgate_proto::lru::Lru;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// Where ext-proc's admin port takes usage records.
const RECORDS_PATH: &str = "/v1/usage/records";
/// Where ext-proc's admin port spends from shared rate limits.
pub(crate) const SPEND_PATH: &str = "/v1/limits/spend";

/// How long a batch to ext-proc's admin port may take.
const BATCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often shared token debits are sent where no accounting interval is configured.
const DEFAULT_FLUSH_MS: u64 = 1000;

/// The headers of a call to ext-proc's admin port, with the internal token where one is configured.
pub(crate) fn admin_call_headers<'a>(
    method: &'a str,
    path: &'a str,
    content_type: &'a str,
    token: Option<&'a str>,
) -> Vec<(&'a str, &'a str)> {
    let mut headers =
        vec![(":method", method), (":path", path), (":authority", "modelgate-admin"), ("content-type", content_type)];
    headers.extend(token.map(|token| (headers::INTERNAL_TOKEN, token)));
    headers
}

/// What this worker's requests share for the gate.
#[derive(Debug, Default)]
pub struct GateShared {
    /// Envoy's counter of the times the gate gave no verdict, or did not take a kept answer.
    pub store_failures: Option<u32>,
    /// Envoy's counter of the cache hits this worker answered from its own copies.
    pub local_hits: Option<u32>,
    /// This worker's copies of cached answers, by [`modelgate_proto::replay::local_key`],
    /// bounded by `cache.local_max_bytes`.
    copies: RefCell<Lru<LocalCopy>>,
    /// This VM's part of its budget reservations' ids.
    worker: String,
    reservations: Cell<u64>,
}

impl GateShared {
    /// The live copy kept under `key`.
    pub fn copy(&self, key: &str, now_ms: u64) -> Option<LocalCopy> {
        self.copies.borrow_mut().get(key, now_ms).cloned()
    }

    /// Keeps `copy` under `key` until `expires_ms`.
    pub fn keep_copy(&self, key: &str, copy: LocalCopy, expires_ms: u64) {
        self.copies.borrow_mut().put(key, copy, expires_ms);
    }

    /// Drops the copy under `key`: its client asked for a fresh answer.
    pub fn forget_copy(&self, key: &str) {
        self.copies.borrow_mut().remove(key);
    }

    /// A new budget reservation's id, for a request that started at `started_us`.
    pub fn reservation_id(&self, started_us: u64) -> String {
        let counter = self.reservations.get() + 1;
        self.reservations.set(counter);
        crate::gate::reservation_id(&self.worker, counter, started_us)
    }
}

#[derive(Default)]
pub struct Worker {
    router: Rc<Router>,
    /// This worker's usage records and shared token settlements, sent on the timer.
    outbox: Rc<Outbox>,
    /// This VM's part of its batches' ids (usage records and token debits), made on the first tick.
    sender: Option<String>,
    /// Envoy's counter of the times the shared rate-limit store gave no verdict.
    store_failures: Option<u32>,
    /// Envoy's counter of the usage records this worker dropped.
    records_dropped: Option<u32>,
    /// Batches sent and not yet answered, by call: put back in the outbox if they fail.
    in_flight: HashMap<u32, Batch>,
    gate: Rc<GateShared>,
}

enum Batch {
    Records(RecordBatch),
    Debits(outbox::Debits),
}

impl Worker {
    /// Reads the plugin's configuration; one that does not parse is refused, so Envoy rejects it at load time.
    pub fn configure<H: Host>(&mut self, host: &H) -> bool {
        match Router::from_json(&host.plugin_configuration()) {
            Ok(router) => {
                let flush_ms = match (router.accounting(), router.shared_limits()) {
                    (Some(accounting), _) => Some(accounting.flush_interval_ms),
                    (None, Some(_)) => Some(DEFAULT_FLUSH_MS),
                    (None, None) => None,
                };
                if let Some(ms) = flush_ms {
                    host.set_tick_period(Duration::from_millis(ms.max(10)));
                }
                if router.shared_limits().is_some() {
                    self.store_failures = host.counter("modelgate.shared_limits.store_failures");
                }
                if router.accounting().is_some() {
                    self.records_dropped = host.counter("modelgate.usage_records_dropped");
                }
                if router.cache().is_some() || router.budgets().is_some() {
                    let local_max_bytes = router.cache().map_or(0, |cache| cache.local_max_bytes);
                    self.gate = Rc::new(GateShared {
                        store_failures: host.counter("modelgate.gate.store_failures"),
                        local_hits: (local_max_bytes > 0).then(|| host.counter("modelgate.cache.local_hits")).flatten(),
                        copies: RefCell::new(Lru::new(local_max_bytes)),
                        worker: random_hex(),
                        reservations: Cell::new(0),
                    });
                }
                self.router = Rc::new(router);
                true
            }
            Err(e) => {
                host.log_error(&e);
                false
            }
        }
    }

    /// A new request's flow.
    pub fn new_flow(&self) -> Flow {
        Flow::new(Rc::clone(&self.router), Rc::clone(&self.outbox), self.store_failures, Rc::clone(&self.gate))
    }

    /// Sends the usage records and token settlements this worker holds, and tells of what it dropped.
    pub fn on_tick<H: Host>(&mut self, host: &H) {
        let dropped = self.outbox.take_dropped();
        if dropped > 0 {
            host.log_error(&format!(
                "modelgate: {dropped} usage records dropped: ext-proc's admin port is not taking them"
            ));
            if let Some(metric) = self.records_dropped {
                host.count_by(metric, dropped);
            }
        }
        let dropped = self.outbox.take_dropped_debits();
        if dropped > 0 {
            host.log_error(&format!(
                "modelgate: {dropped} batches of token debits dropped: the shared rate-limit store did not take them in five minutes, or refused them"
            ));
        }
        let router = Rc::clone(&self.router);
        let sender = self.sender.get_or_insert_with(|| batch_sender(host.now_us())).clone();
        if let Some(shared) = router.shared_limits() {
            for debits in self.outbox.take_debits(&sender, host.now_us()) {
                self.send(host, &shared.cluster, Batch::Debits(debits));
            }
        }
        if let Some(accounting) = router.accounting() {
            if let Some(batch) = self.outbox.take(&sender, host.now_us() / 1000) {
                self.send(host, &accounting.cluster, Batch::Records(batch));
            }
        }
    }

    /// A batch that did not land goes back in the outbox, for the next tick; one refused is dropped.
    pub fn on_batch_answer<H: Host>(&mut self, host: &H, token_id: u32, num_headers: usize) {
        let Some(batch) = self.in_flight.remove(&token_id) else {
            return;
        };
        let status = host.http_call_header(num_headers, ":status").unwrap_or_default();
        match outbox::delivery(&status) {
            Delivery::Taken => {}
            Delivery::Retry => {
                host.log_error(&format!(
                    "modelgate: ext-proc's admin port did not take a batch of usage records or token debits (status {}); it is kept for the next try",
                    String::from_utf8_lossy(&status)
                ));
                self.requeue(batch);
            }
            Delivery::Refused => {
                host.log_error(&format!(
                    "modelgate: ext-proc's admin port refused a batch of usage records or token debits (status {}); it is dropped",
                    String::from_utf8_lossy(&status)
                ));
                match batch {
                    Batch::Records(batch) => self.outbox.give_up(&batch),
                    Batch::Debits(_) => self.outbox.give_up_debits(),
                }
            }
        }
    }

    fn send<H: Host>(&mut self, host: &H, cluster: &str, batch: Batch) {
        let token = self.router.internal_token();
        let sent = match &batch {
            Batch::Records(batch) => {
                let mut call = admin_call_headers("POST", RECORDS_PATH, "application/x-ndjson", token);
                call.push((headers::BATCH_ID, &batch.id));
                host.dispatch(cluster, call, &batch.lines, BATCH_TIMEOUT)
            }
            Batch::Debits(debits) => {
                let call = serde_json::to_vec(&debits.request).unwrap_or_default();
                host.dispatch(
                    cluster,
                    admin_call_headers("POST", SPEND_PATH, "application/json", token),
                    &call,
                    BATCH_TIMEOUT,
                )
            }
        };
        match sent {
            Some(token) => {
                self.in_flight.insert(token, batch);
            }
            None => self.requeue(batch),
        }
    }

    fn requeue(&self, batch: Batch) {
        match batch {
            Batch::Records(batch) => self.outbox.put_back(batch),
            Batch::Debits(debits) => self.outbox.put_back_debits(debits),
        }
    }
}

/// This VM's part of its batches' ids: 64 random bits and the time, so no
/// two workers or Envoy restarts share one.
fn batch_sender(now_us: u64) -> String {
    format!("{}-{now_us:x}", random_hex())
}

/// 64 random bits from the host (WASI's `random_get`, which keys std's hasher), in hex.
fn random_hex() -> String {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(0u8);
    format!("{random:016x}")
}
