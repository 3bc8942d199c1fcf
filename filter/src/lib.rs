//! modelgate's proxy-wasm HTTP filter.
//!
//! Per request it drops internal headers a client may have sent, answers
//! `/v1/models` from configuration, and for model-routed endpoints buffers the
//! body (up to the configured limit), reads `model` once, and writes the
//! chosen cluster into a header the route table matches on. On the way back it
//! adds `openai-processing-ms` and rewrites every error answer — a backend's or
//! Envoy's own — as an OpenAI error envelope. Successful answers, streams
//! included, are never buffered.
//!
//! The callbacks stay thin: decisions are in [`request`]. Host calls go through
//! [`host`], which never panics, because a panic kills the VM for every later
//! request on its worker.

pub mod answer;
pub mod endpoint;
mod host;
pub mod outbox;
pub mod request;
pub mod routing_fields;

use modelgate_proto::error::{retry_header, GatewayError};
use modelgate_proto::error_normalize::{self, normalize, Origin};
use modelgate_proto::headers;
use modelgate_proto::keys::{Caller, Presented};
use modelgate_proto::limits::{self, Admission, Bucket, Reserved};
use modelgate_proto::routing::Router;
use outbox::{Delivery, Outbox, RecordBatch};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use request::{HeadersVerdict, Reply, RequestHead, Routing};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Plugin {
            router: Rc::new(Router::default()),
            outbox: Rc::new(Outbox::default()),
            sender: None,
            store_failures: None,
            records_dropped: None,
            in_flight: HashMap::new(),
        })
    });
}}

struct Plugin {
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
}

enum Batch {
    Records(RecordBatch),
    Debits(outbox::Debits),
}

/// Where ext-proc's admin port takes usage records.
const RECORDS_PATH: &str = "/v1/usage/records";
/// Where ext-proc's admin port spends from shared rate limits.
const SPEND_PATH: &str = "/v1/limits/spend";

/// The headers of a call to ext-proc's admin port, with the internal token where one is configured.
fn admin_call_headers<'a>(path: &'a str, content_type: &'a str, token: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    let mut headers =
        vec![(":method", "POST"), (":path", path), (":authority", "modelgate-admin"), ("content-type", content_type)];
    headers.extend(token.map(|token| (headers::INTERNAL_TOKEN, token)));
    headers
}

impl Context for Plugin {
    /// A batch that did not land goes back in the outbox, for the next tick; one refused is dropped.
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, _body_size: usize, _num_trailers: usize) {
        let Some(batch) = self.in_flight.remove(&token_id) else {
            return;
        };
        let status = host::http_call_header(num_headers, ":status").unwrap_or_default();
        match outbox::delivery(&status) {
            Delivery::Taken => {}
            Delivery::Retry => {
                host::log_error(&format!(
                    "modelgate: ext-proc's admin port did not take a batch of usage records or token debits (status {}); it is kept for the next try",
                    String::from_utf8_lossy(&status)
                ));
                self.requeue(batch);
            }
            Delivery::Refused => {
                host::log_error(&format!(
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
}

impl Plugin {
    fn send(&mut self, cluster: &str, batch: Batch) {
        let router = Rc::clone(&self.router);
        let token = router.internal_token();
        let sent = match &batch {
            Batch::Records(batch) => {
                let mut call = admin_call_headers(RECORDS_PATH, "application/x-ndjson", token);
                call.push((headers::BATCH_ID, &batch.id));
                host::dispatch(cluster, call, &batch.lines, BATCH_TIMEOUT)
            }
            Batch::Debits(debits) => {
                let call = serde_json::to_vec(&debits.request).unwrap_or_default();
                host::dispatch(cluster, admin_call_headers(SPEND_PATH, "application/json", token), &call, BATCH_TIMEOUT)
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

impl RootContext for Plugin {
    /// A configuration that does not parse is refused, so Envoy rejects it at load time.
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        match Router::from_json(&config) {
            Ok(router) => {
                let flush_ms = match (router.accounting(), router.shared_limits()) {
                    (Some(accounting), _) => Some(accounting.flush_interval_ms),
                    (None, Some(_)) => Some(DEFAULT_FLUSH_MS),
                    (None, None) => None,
                };
                if let Some(ms) = flush_ms {
                    self.set_tick_period(Duration::from_millis(ms.max(10)));
                }
                if router.shared_limits().is_some() {
                    self.store_failures = host::counter("modelgate.shared_limits.store_failures");
                }
                if router.accounting().is_some() {
                    self.records_dropped = host::counter("modelgate.usage_records_dropped");
                }
                self.router = Rc::new(router);
                true
            }
            Err(e) => {
                host::log_error(&e);
                false
            }
        }
    }

    /// Sends the usage records and token settlements this worker holds, and tells of what it dropped.
    fn on_tick(&mut self) {
        let dropped = self.outbox.take_dropped();
        if dropped > 0 {
            host::log_error(&format!(
                "modelgate: {dropped} usage records dropped: ext-proc's admin port is not taking them"
            ));
            if let Some(metric) = self.records_dropped {
                host::count_by(metric, dropped);
            }
        }
        let dropped = self.outbox.take_dropped_debits();
        if dropped > 0 {
            host::log_error(&format!(
                "modelgate: {dropped} batches of token debits dropped: the shared rate-limit store did not take them in five minutes, or refused them"
            ));
        }
        let router = Rc::clone(&self.router);
        let sender = self.sender.get_or_insert_with(host::batch_sender).clone();
        if let Some(shared) = router.shared_limits() {
            for debits in self.outbox.take_debits(&sender, host::now_us()) {
                self.send(&shared.cluster, Batch::Debits(debits));
            }
        }
        if let Some(accounting) = router.accounting() {
            if let Some(batch) = self.outbox.take(&sender, host::now_us() / 1000) {
                self.send(&accounting.cluster, Batch::Records(batch));
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            router: Rc::clone(&self.router),
            outbox: Rc::clone(&self.outbox),
            accounting: self.router.accounting().is_some(),
            store_failures: self.store_failures,
            request_id: String::new(),
            held: None,
            reading_body: None,
            started_us: 0,
            answered_here: false,
            error: None,
            guarded: false,
            caller: None,
            admission: Admission::default(),
            routed: None,
            answer: None,
            status: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    router: Rc<Router>,
    /// Where this request's usage record and shared token settlement go.
    outbox: Rc<Outbox>,
    /// Usage records are kept.
    accounting: bool,
    /// The counter of the shared store's failures, where limits are shared.
    store_failures: Option<u32>,
    /// The request's `x-request-id`, bounded.
    request_id: String,
    /// A request held while the shared store decides on it.
    held: Option<Held>,
    /// The bytes of a model-routed request's body buffered so far, while it is read.
    reading_body: Option<usize>,
    /// When the request's headers came, in microseconds since the Unix epoch (0 if unknown).
    started_us: u64,
    /// The filter answered itself: the answer is already an OpenAI error.
    answered_here: bool,
    /// An error answer buffered for rewriting.
    error: Option<Failed>,
    /// Sent through the stream guard: Envoy's code details come from the inner listener.
    guarded: bool,
    /// The client key the request came with, where keys are configured.
    caller: Caller,
    /// What the key's limits said, for the answer's `x-ratelimit-*` headers.
    admission: Admission,
    /// A model-routed request past its key check: what its usage record and token settlement need.
    routed: Option<Routed>,
    answer: Option<answer::Answer>,
    /// The status the client got.
    status: u16,
}

/// An error answer being read, to be rewritten as an OpenAI error.
struct Failed {
    status: u16,
    /// Envoy's code details: who answered, and why.
    details: String,
    /// The attempts made (a fallback chain's).
    attempts: u32,
    /// The body's `content-encoding`, where it is compressed: the rewritten body is not.
    encoding: Option<String>,
}

/// A routed request waiting for the shared store's verdict.
struct Held {
    routing: Routing,
    body_len: usize,
    /// The tokens it asked to reserve, and when it asked.
    reserved_tokens: u64,
    asked_us: u64,
}

/// A model-routed request, as far as it got.
struct Routed {
    model: String,
    /// An exact route names the model.
    exact_route: bool,
    /// Empty until a backend is chosen.
    backend: String,
    price: Option<modelgate_proto::config::Price>,
    /// The key's buckets for this model.
    buckets: Vec<Bucket>,
    /// What the request holds in the key's token buckets, settled with the answer's usage.
    reserved: Vec<Reserved>,
}

/// How long a batch to ext-proc's admin port may take.
const BATCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often shared token debits are sent where no accounting interval is configured.
const DEFAULT_FLUSH_MS: u64 = 1000;

impl Context for Request {
    /// The shared store's verdict on a held request.
    fn on_http_call_response(&mut self, _token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(Held { routing, body_len, reserved_tokens, asked_us }) = self.held.take() else {
            return;
        };
        // Envoy still holds the request body it buffered for the filter.
        let body = host::body(BufferType::HttpRequestBody, body_len);
        let status = host::http_call_header(num_headers, ":status");
        let answer = host::body(BufferType::HttpCallResponseBody, body_size);
        let verdict =
            self.routed.as_ref().and_then(|r| request::shared_verdicts(&r.buckets, status.as_deref(), &answer));
        match self.admit_shared(verdict, reserved_tokens, asked_us) {
            None => {
                // The request's headers and body are changed before it resumes: once resumed, Envoy no longer lets them be.
                self.forward(routing, &body);
                host::resume_request();
            }
            Some(reply) => {
                self.respond(&reply);
            }
        }
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.started_us = host::now_us();
        for name in headers::INTERNAL {
            host::remove_header(MapType::HttpRequestHeaders, name);
        }
        let (request_id, replaced) =
            request::request_id(host::header(MapType::HttpRequestHeaders, REQUEST_ID).as_deref());
        if replaced {
            // Envoy answers with the request's header as it is now (`always_set_request_id_in_response`).
            host::set_header(MapType::HttpRequestHeaders, REQUEST_ID, &request_id);
        }
        self.request_id = request_id;
        let method = host::header(MapType::HttpRequestHeaders, ":method").unwrap_or_default();
        let path = host::header(MapType::HttpRequestHeaders, ":path").unwrap_or_default();
        let content_type = host::header(MapType::HttpRequestHeaders, "content-type");
        let content_length = host::header(MapType::HttpRequestHeaders, "content-length");
        // Two more host calls, only where keys are configured.
        let (authorization, api_key) = if self.router.client_keys().required() {
            (
                host::header(MapType::HttpRequestHeaders, "authorization"),
                host::header(MapType::HttpRequestHeaders, "api-key"),
            )
        } else {
            (None, None)
        };
        let head = RequestHead {
            method: &String::from_utf8_lossy(&method),
            path: &String::from_utf8_lossy(&path),
            content_type: content_type.as_deref(),
            content_length: content_length.as_deref(),
            end_of_stream,
            presented: Presented { authorization: authorization.as_deref(), api_key: api_key.as_deref() },
        };
        let verdict = request::on_request_headers(&self.router, head);
        match verdict {
            HeadersVerdict::PassThrough => Action::Continue,
            HeadersVerdict::ReadBody(caller) => {
                self.reading_body = Some(0);
                self.caller = caller;
                self.routed = Some(Routed {
                    model: String::new(),
                    exact_route: false,
                    backend: String::new(),
                    price: None,
                    buckets: Vec::new(),
                    reserved: Vec::new(),
                });
                Action::Pause
            }
            HeadersVerdict::Respond(reply) => self.respond(&reply),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(reply) = request::body_too_large(&self.router, body_size) {
            return self.respond(&reply);
        }
        if !end_of_stream {
            self.reading_body = Some(body_size);
            return Action::Pause;
        }
        self.reading_body = None;
        self.on_body_read(body_size)
    }

    /// A body followed by trailers (HTTP/2 allows it) ends with them: its last piece came without end_of_stream.
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        match self.reading_body.take() {
            Some(body_size) => self.on_body_read(body_size),
            None => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if let Some(ms) = self.processing_ms() {
            host::set_header(MapType::HttpResponseHeaders, PROCESSING_MS, &ms);
        }
        for (name, value) in limits::headers(&self.admission) {
            host::set_header(MapType::HttpResponseHeaders, name, &value);
        }
        // The inner listener's reason, for this filter only: never sent on to the client.
        let relayed_details = if self.guarded {
            let details = host::header(MapType::HttpResponseHeaders, headers::CODE_DETAILS);
            host::remove_header(MapType::HttpResponseHeaders, headers::CODE_DETAILS);
            details
        } else {
            None
        };
        if self.answered_here {
            return Action::Continue;
        }
        let status = host::header(MapType::HttpResponseHeaders, ":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
            .unwrap_or(200);
        self.status = status;
        if self.accounting {
            // A fallback chain may have been answered by another backend than the first.
            if let (Some(routed), Some(backend)) =
                (&mut self.routed, host::header(MapType::HttpResponseHeaders, headers::SERVED_BY))
            {
                routed.backend = String::from_utf8_lossy(&backend).into_owned();
            }
        }
        if status < 400 {
            // A model's answer with nothing in it is a broken backend, not a success.
            if let (true, Some(answer)) = (end_of_stream && (200..300).contains(&status), &mut self.answer) {
                answer.failed();
                let error = GatewayError::bad_answer("a success and an empty body");
                return self.respond(&Reply::from(error));
            }
            return Action::Continue;
        }
        if let Some(answer) = &mut self.answer {
            answer.failed();
        }
        let details = code_details(relayed_details);
        // A fallback chain's retries: the route says how many attempts were made.
        let attempts = host::header(MapType::HttpResponseHeaders, headers::ATTEMPTS)
            .and_then(|n| std::str::from_utf8(&n).ok()?.parse::<u32>().ok())
            .unwrap_or(1);
        if end_of_stream {
            // No body will follow to rewrite: answer anew with the envelope.
            return match normalize(status, Origin::from_code_details(&details).after_attempts(attempts), b"") {
                Some(rewritten) => self.respond(&Reply::rewritten(status, rewritten)),
                None => Action::Continue,
            };
        }
        let encoding = host::header(MapType::HttpResponseHeaders, "content-encoding")
            .map(|e| String::from_utf8_lossy(&e).into_owned())
            .filter(|e| !e.eq_ignore_ascii_case("identity"));
        self.error = Some(Failed { status, details, attempts, encoding });
        host::remove_header(MapType::HttpResponseHeaders, "content-length");
        Action::Pause
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(Failed { status, details, attempts, encoding }) = &self.error else {
            if let Some(answer) = &mut self.answer {
                // The body is read only where usage is counted; every piece is timed.
                let piece =
                    if answer.reads_body() { host::body(BufferType::HttpResponseBody, body_size) } else { Vec::new() };
                if let Some(passed) = answer.on_piece(host::now_us(), &piece, end_of_stream) {
                    host::replace_body(BufferType::HttpResponseBody, body_size, &passed);
                }
            }
            if end_of_stream {
                // Before the answer's end leaves: the client's next request sees these tokens settled.
                self.settle_tokens();
            }
            return Action::Continue;
        };
        if !end_of_stream {
            return Action::Pause;
        }
        let body = host::body(BufferType::HttpResponseBody, body_size);
        // A compressed body is not read: it is always replaced, by a body that is not compressed.
        let readable = encoding
            .as_deref()
            .map_or(std::borrow::Cow::Borrowed(&body[..]), |e| error_normalize::compressed_body(e).into());
        let length = match normalize(*status, Origin::from_code_details(details).after_attempts(*attempts), &readable) {
            Some(rewritten) => {
                host::replace_body(BufferType::HttpResponseBody, body_size, &rewritten.body);
                host::set_header(MapType::HttpResponseHeaders, "content-type", "application/json");
                host::remove_header(MapType::HttpResponseHeaders, "content-encoding");
                if let Some((name, value)) = retry_header(rewritten.should_retry) {
                    host::set_header(MapType::HttpResponseHeaders, name, value);
                }
                rewritten.body.len()
            }
            None => body.len(),
        };
        host::set_header(MapType::HttpResponseHeaders, "content-length", &length.to_string());
        Action::Continue
    }

    /// The request is over: its tokens are settled in the key's token
    /// limits, and its usage record is handed to this worker's outbox, or,
    /// refused before any backend, it is counted with the worker's refusals.
    fn on_log(&mut self) {
        self.settle_tokens();
        let Some(routed) = self.routed.take().filter(|_| self.accounting) else {
            return;
        };
        let finished = request::Finished {
            request_id: &self.request_id,
            key: self.caller.as_ref().map_or("", |key| key.name.as_str()),
            model: &routed.model,
            exact_route: routed.exact_route,
            backend: &routed.backend,
            price: routed.price.as_ref(),
            status: self.status,
        };
        match &mut self.answer {
            Some(answer) => self.outbox.push(&request::usage_record(answer.record(host::now_us()), finished)),
            None => self.outbox.refuse(request::refused(finished)),
        }
    }
}

/// Why Envoy answered as it did: `via_upstream` for a backend's answer, or
/// the reason of a local reply. Behind the stream guard, the inner
/// listener's reason is the one that counts.
fn code_details(relayed: Option<Vec<u8>>) -> String {
    let details = relayed.or_else(|| host::property(&["response", "code_details"]));
    details.map(|d| String::from_utf8_lossy(&d).into_owned()).unwrap_or_default()
}

/// The request's id, which Envoy returns on every answer.
const REQUEST_ID: &str = "x-request-id";

/// Milliseconds the gateway and the backend took, as OpenAI reports them.
const PROCESSING_MS: &str = "openai-processing-ms";

impl Request {
    /// Routes (or refuses) a model-routed request once its whole body is buffered.
    fn on_body_read(&mut self, body_size: usize) -> Action {
        let body = host::body(BufferType::HttpRequestBody, body_size);
        match request::on_request_body(&self.router, &body, self.caller.as_deref()) {
            Ok(routing) => self.route(routing, &body),
            Err(reply) => self.respond(&reply),
        }
    }

    fn processing_ms(&self) -> Option<String> {
        let now_us = host::now_us();
        (self.started_us > 0 && now_us >= self.started_us).then(|| ((now_us - self.started_us) / 1000).to_string())
    }

    /// Settles what the answer used with what the request reserved in the
    /// key's token limits, once: at the answer's end, or when the request
    /// ends without one. An error answer used nothing; an answer whose usage
    /// is unknown (a stream the client left) keeps its reservation. Shared
    /// limits are settled with this worker's next batch.
    fn settle_tokens(&mut self) {
        let Some(routed) = &mut self.routed else {
            return;
        };
        if routed.reserved.is_empty() {
            return;
        }
        let used = if self.status >= 400 {
            Some(0)
        } else {
            self.answer.as_ref().and_then(answer::Answer::usage).map(|usage| usage.total())
        };
        // Settled: nothing is left to settle twice.
        let reserved = std::mem::take(&mut routed.reserved);
        if self.router.shared_limits().is_some() {
            self.outbox.settle(&reserved, used, host::now_us());
        } else {
            limits::settle(&host::SharedBuckets, &reserved, used, host::now_us());
        }
    }

    /// Sends a routed request on to its backend, once its key's limits admit
    /// it: counted here, or asked of the shared store (and then held until it answers).
    fn route(&mut self, routing: Routing, body: &[u8]) -> Action {
        if let Some(routed) = &mut self.routed {
            routed.model.clone_from(&routing.model);
            routed.exact_route = routing.exact_route;
        }
        let (Some(routed), Some(caller)) = (&mut self.routed, self.caller.clone()) else {
            return self.forward(routing, body);
        };
        routed.buckets = caller.limits.buckets(&caller.name, &routing.model);
        if routed.buckets.is_empty() {
            return self.forward(routing, body);
        }
        let reserved_tokens =
            match request::reservation(&self.router, &caller, &routed.buckets, &routing.model, routing.tokens) {
                Ok(tokens) => tokens,
                Err(reply) => return self.respond(&reply),
            };
        let Some(shared) = self.router.shared_limits() else {
            let now = host::now_us();
            match request::rate_limit(
                &caller,
                &routed.buckets,
                &routing.model,
                reserved_tokens,
                &host::SharedBuckets,
                now,
            ) {
                Ok((admission, reserved)) => (self.admission, routed.reserved) = (admission, reserved),
                Err(reply) => return self.respond(&reply),
            }
            return self.forward(routing, body);
        };
        let call = serde_json::to_vec(&Bucket::admission(&routed.buckets, reserved_tokens)).unwrap_or_default();
        let headers = admin_call_headers(SPEND_PATH, "application/json", self.router.internal_token());
        // Asked before the store's clock starts the reservation: it is taken to refill no later than it does.
        let asked_us = host::now_us();
        if host::dispatch(&shared.cluster, headers, &call, Duration::from_millis(shared.timeout_ms)).is_some() {
            self.held = Some(Held { routing, body_len: body.len(), reserved_tokens, asked_us });
            return Action::Pause;
        }
        match self.admit_shared(None, reserved_tokens, asked_us) {
            None => self.forward(routing, body),
            Some(reply) => self.respond(&reply),
        }
    }

    /// Takes the shared store's verdicts (`None` when it gave none) on a
    /// request reserving `reserved_tokens`, asked at `asked_us`: the reply
    /// that refuses the request, if it is refused.
    fn admit_shared(
        &mut self,
        verdicts: Option<Vec<limits::Verdict>>,
        reserved_tokens: u64,
        asked_us: u64,
    ) -> Option<Reply> {
        let caller = self.caller.clone()?;
        let routed = self.routed.as_mut()?;
        let judged = match verdicts {
            Some(verdicts) => {
                request::judge(&caller, &routed.model, &routed.buckets, &verdicts, reserved_tokens, asked_us)
            }
            None => {
                if let Some(metric) = self.store_failures {
                    host::count(metric);
                }
                host::log_error("modelgate: the shared rate-limit store gave no verdict (see ext-proc's log)");
                request::without_shared_store(self.router.shared_limits().map(|s| s.on_failure).unwrap_or_default())
                    // Let through unlimited: it holds nothing, and its usage is charged once known.
                    .map(|admission| (admission, limits::unreserved(&routed.buckets, asked_us)))
            }
        };
        match judged {
            Ok((admission, reserved)) => {
                self.admission = admission;
                routed.reserved = reserved;
                None
            }
            Err(reply) => Some(reply),
        }
    }

    /// Sends an admitted request on to its backend: routing headers, and the body as the backend gets it.
    fn forward(&mut self, routing: Routing, body: &[u8]) -> Action {
        let Some(routed) = &mut self.routed else {
            return Action::Continue;
        };
        routed.backend.clone_from(&routing.backend);
        routed.price = routing.price;
        let count_tokens = self.accounting || routed.buckets.iter().any(|b| b.unit == limits::Unit::Tokens);
        self.answer = Some(answer::Answer::new(self.started_us, routing.stream, count_tokens, routing.usage_unasked));
        if count_tokens {
            // A compressed answer's usage could not be read, nor its usage chunk removed.
            host::remove_header(MapType::HttpRequestHeaders, "accept-encoding");
        }
        if let Some(edit) = &routing.body_edit {
            let edited = edit.apply(body);
            host::replace_body(BufferType::HttpRequestBody, body.len(), &edited);
            host::set_header(MapType::HttpRequestHeaders, "content-length", &edited.len().to_string());
        }
        // Envoy clears the route cache itself when a wasm filter changes request
        // headers, so the route table sees the cluster header (the tests prove it).
        host::set_header(MapType::HttpRequestHeaders, headers::CLUSTER, &routing.cluster);
        if let Some(profile) = &routing.profile {
            host::set_header(MapType::HttpRequestHeaders, routing.profile_header(), profile);
        }
        if let Some(chain) = &routing.chain {
            host::set_header(MapType::HttpRequestHeaders, headers::CHAIN, chain);
            self.guarded = true;
        }
        if !routing.forwards_client_key {
            for name in headers::CLIENT_KEYS {
                host::remove_header(MapType::HttpRequestHeaders, name);
            }
        }
        if let Some(cluster) = &routing.stream_cluster {
            host::set_header(MapType::HttpRequestHeaders, headers::STREAM_CLUSTER, cluster);
            self.guarded = true;
        }
        if let (true, Some(token)) = (self.guarded, self.router.internal_token()) {
            host::set_header(MapType::HttpRequestHeaders, headers::INTERNAL_TOKEN, token);
        }
        Action::Continue
    }

    /// Answers the request from the filter; the answer is an OpenAI error or a models listing.
    fn respond(&mut self, reply: &Reply) -> Action {
        self.answered_here = true;
        self.status = reply.status;
        let processing_ms = self.processing_ms().unwrap_or_default();
        let mut response_headers = vec![("content-type", "application/json"), (PROCESSING_MS, processing_ms.as_str())];
        response_headers.extend(reply.headers.iter().map(|(name, value)| (*name, value.as_str())));
        host::send_response(reply.status, response_headers, &reply.body);
        Action::Pause
    }
}
