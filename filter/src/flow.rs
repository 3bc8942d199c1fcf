//! One request's way through the filter, over any [`Host`].
//!
//! The request side is a [`Phase`]: read its headers, buffer a model-routed
//! request's body, hold it while the shared rate-limit store decides, then
//! forward it or refuse it. The answer side is a [`Response`]: awaited,
//! passing on, an error buffered to be rewritten, or the filter's own reply.
//! The two are apart because Envoy may answer in any phase (a timeout while
//! the body is read). Decisions on values are in [`crate::request`]; this
//! module carries them out through the host.

use crate::answer::Answer;
use crate::gate::{self, Keep, LocalCopy};
use crate::host::{Host, SharedBuckets};
use crate::outbox::Outbox;
use crate::request::{self, HeadersVerdict, ModelsQuery, Reply, RequestHead, Routing};
use crate::worker::{admin_call_headers, GateShared, SPEND_PATH};
use modelgate_proto::client_api::ClientApi;
use modelgate_proto::config::Price;
use modelgate_proto::endpoint::Endpoint;
use modelgate_proto::error::{retry_header, GatewayError};
use modelgate_proto::error_normalize::{self, normalize_in, Origin};
use modelgate_proto::gate::{
    CacheAsk, GateVerdict, IdempotencyAsk, ReplaySource, CACHE_HEADER, GATE_PATH, GATE_STORE_PATH,
    IDEMPOTENCY_KEY_HEADER, REPLAYED_HEADER,
};
use modelgate_proto::headers;
use modelgate_proto::keys::{is_internal_token, Caller, ClientKey, Presented};
use modelgate_proto::limits::{self, Admission, Bucket, Reserved, Unit, Verdict};
use modelgate_proto::models::POOL_MODELS_PATH;
use modelgate_proto::replay;
use modelgate_proto::routing::Router;
use modelgate_proto::usage::{Traffic, Usage, UsageRecord};
use proxy_wasm::types::{Action, BufferType, MapType};
use std::borrow::Cow;
use std::rc::Rc;
use std::time::Duration;

/// The request's id, which Envoy returns on every answer.
const REQUEST_ID: &str = "x-request-id";

/// Milliseconds the gateway and the backend took, as OpenAI reports them.
const PROCESSING_MS: &str = "openai-processing-ms";

/// How long ext-proc's admin port may take to say which models pools serve.
const POOL_MODELS_TIMEOUT: Duration = Duration::from_secs(1);

const REQUEST_HEADERS: MapType = MapType::HttpRequestHeaders;
const RESPONSE_HEADERS: MapType = MapType::HttpResponseHeaders;
const RESPONSE_TRAILERS: MapType = MapType::HttpResponseTrailers;

/// One request, from its headers to its log.
pub struct Flow {
    router: Rc<Router>,
    /// Where the request's usage record and shared token settlement go.
    outbox: Rc<Outbox>,
    /// Envoy's counter of the shared store's failures, where limits are shared.
    store_failures: Option<u32>,
    /// What the worker's requests share for the gate.
    gate: Rc<GateShared>,
    /// The endpoint of a model-routed request.
    endpoint: Endpoint,
    /// The client's `Idempotency-Key`, where idempotency is configured.
    idempotency_key: Option<String>,
    /// The request's `cache-control`, as the gate reads it: (look up, store).
    cache_control: (bool, bool),
    /// When the request's headers came, in microseconds since the Unix epoch (0 if unknown).
    started_us: u64,
    /// The request's `x-request-id`, bounded.
    request_id: String,
    /// A batch's line, sent by the batch runner on its key's behalf, or a client's own request.
    traffic: Traffic,
    /// The API the client speaks, by the request's path: its errors' envelope.
    api: ClientApi,
    /// Its answer's usage counts: false for an endpoint that is no completion
    /// (`/tokenize`), whose answer has none and whose key's token limits it leaves alone.
    counts_usage: bool,
    /// The request came with a client key header: only then are they dropped.
    presents_key: bool,
    phase: Phase,
    response: Response,
}

/// Where the request is.
#[derive(Debug)]
enum Phase {
    /// Not a model-routed request (or its headers are still to come): it
    /// passes on, or the filter answers its headers. A body that reaches the
    /// filter is still checked as a model's request body is (it always was);
    /// `buffered` is its size while it is held without its end.
    Unrouted { buffered: Option<usize> },
    /// Sent on to one of ext-proc's services (the Files and Batch APIs, pool
    /// operations): its body streams through unread, however large; the service bounds it.
    Service,
    /// `/v1/models` held while ext-proc says which models pools discovered.
    AwaitingPoolModels(ModelsQuery),
    /// A model-routed request whose body is being buffered: `buffered` bytes so far.
    ReadingBody { caller: Caller, endpoint: Endpoint, buffered: usize },
    /// Held while the shared rate-limit store decides on it.
    AwaitingSharedLimits(Held),
    /// Admitted by its limits, held while ext-proc's gate decides on it.
    AwaitingGate(Box<Gated>),
    /// Answered from the gate's store: a cached answer, or an idempotent request's first answer.
    Replayed(Replayed),
    /// A model-routed request the filter refused before any backend: what its refusal count needs.
    Refused { caller: Caller, model: String, exact_route: bool },
    /// Sent on to its backend.
    Forwarded(Forwarded),
}

/// A routed request waiting for the shared store's verdict.
#[derive(Debug)]
struct Held {
    caller: Rc<ClientKey>,
    routing: Routing,
    /// The key's buckets for this model.
    buckets: Vec<Bucket>,
    body_len: usize,
    /// The tokens it asked to reserve, and when it asked.
    reserved_tokens: u64,
    asked_us: u64,
}

/// A request admitted by its limits, waiting for the gate's verdict.
#[derive(Debug)]
struct Gated {
    admitted: Admitted,
    routing: Routing,
    body_len: usize,
    /// Budgets were asked for: a missing verdict follows `budgets.on_failure`.
    budgets: bool,
    /// The route caches the answer: a missing verdict makes a miss.
    cache: bool,
    /// Where this worker keeps its copy of a cached answer the gate replays.
    copy_key: Option<String>,
    reservation: String,
}

/// A request the gate answered from its store.
#[derive(Debug)]
struct Replayed {
    caller: Caller,
    model: String,
    exact_route: bool,
    backend: String,
    stream: bool,
    source: ReplaySource,
    usage: Option<Usage>,
}

/// What the gate said about a request it let through.
#[derive(Debug, Default)]
struct Passed {
    /// The answer is kept for the store (a cache entry, an idempotent request's claim).
    keep: Option<Keep>,
    /// The route caches answers and had none for it: `modelgate-cache: miss`.
    cache_miss: bool,
    /// The budget reservation its usage record settles.
    budget_reservation: Option<String>,
    /// The answer's end is held until the store answers for the kept answer.
    end_held: bool,
}

impl Passed {
    fn is_nothing(&self) -> bool {
        self.keep.is_none() && !self.cache_miss && self.budget_reservation.is_none()
    }
}

/// A request sent on to its backend: what its answer's headers, its token
/// settlement and its usage record need.
#[derive(Debug)]
struct Forwarded {
    caller: Caller,
    model: String,
    /// An exact route names the model.
    exact_route: bool,
    /// The backend chosen, or the one of a fallback chain that answered.
    backend: String,
    price: Option<Price>,
    /// What the request holds in the key's token buckets, settled once with the answer's usage.
    reserved: Vec<Reserved>,
    /// What the key's limits said, for the answer's `x-ratelimit-*` headers.
    admission: Admission,
    /// Sent through the stream guard: Envoy's code details come from the inner listener.
    guarded: bool,
    answer: Answer,
    stream: bool,
    /// ext_proc takes the answer's body alone and does not hold its headers:
    /// this filter holds them until the translated body comes, so that an
    /// answer too large to buffer still gets an error (Envoy's local reply)
    /// instead of a client's stream reset after its headers.
    holds_translated_headers: bool,
    /// What the gate said, where it was asked.
    gated: Option<Box<Passed>>,
}

/// What the request's key's limits let through.
#[derive(Debug)]
struct Admitted {
    caller: Caller,
    admission: Admission,
    reserved: Vec<Reserved>,
    /// The key's limits count tokens for this model.
    limits_tokens: bool,
}

impl Admitted {
    fn unlimited(caller: Caller) -> Self {
        Admitted { caller, admission: Admission::default(), reserved: Vec::new(), limits_tokens: false }
    }

    fn new(caller: Rc<ClientKey>, buckets: &[Bucket], admission: Admission, reserved: Vec<Reserved>) -> Self {
        let limits_tokens = buckets.iter().any(|b| b.unit == Unit::Tokens);
        Admitted { caller: Some(caller), admission, reserved, limits_tokens }
    }
}

/// Where the answer is.
#[derive(Debug)]
enum Response {
    /// Its headers are still to come.
    Awaiting,
    /// Going on to the client as it comes.
    Passing { status: u16 },
    /// An error answer being buffered, to be rewritten as an error in the client's API.
    Rewriting(Failed),
    /// The filter answered itself: the answer is already an error in the client's API or a listing.
    Replied { status: u16 },
}

impl Response {
    /// The status the client got; 0 when it got none (it went away first).
    fn status(&self) -> u16 {
        match self {
            Response::Awaiting => 0,
            Response::Passing { status } | Response::Replied { status } => *status,
            Response::Rewriting(failed) => failed.status,
        }
    }
}

/// An error answer being read, to be rewritten as an OpenAI error.
#[derive(Debug)]
struct Failed {
    status: u16,
    /// Envoy's code details: who answered, and why.
    details: String,
    /// The attempts made (a fallback chain's).
    attempts: u32,
    /// The body's `content-encoding`, where it is compressed: the rewritten body is not.
    encoding: Option<String>,
    /// The bytes of the body held so far: an answer ending in trailers is rewritten then.
    held: usize,
}

impl Flow {
    pub fn new(router: Rc<Router>, outbox: Rc<Outbox>, store_failures: Option<u32>, gate: Rc<GateShared>) -> Self {
        Flow {
            router,
            outbox,
            store_failures,
            gate,
            endpoint: Endpoint::ChatCompletions,
            idempotency_key: None,
            cache_control: (true, true),
            started_us: 0,
            request_id: String::new(),
            traffic: Traffic::Interactive,
            api: ClientApi::Openai,
            counts_usage: true,
            presents_key: false,
            phase: Phase::Unrouted { buffered: None },
            response: Response::Awaiting,
        }
    }

    pub fn on_request_headers<H: Host>(&mut self, host: &H, end_of_stream: bool) -> Action {
        self.started_us = host.now_us();
        // One host call for every header the filter reads; one more only for each header it drops.
        let request = host.headers(REQUEST_HEADERS);
        let header = |name: &str| find_header(&request, name);
        // Only where a token could prove them.
        let on_behalf_of = self.router.internal_token().and_then(|token| on_behalf_of(&header, token));
        if on_behalf_of.is_some() {
            self.traffic = Traffic::Batch;
        }
        for name in headers::INTERNAL.iter().filter(|name| header(name).is_some()) {
            host.remove_header(REQUEST_HEADERS, name);
        }
        self.presents_key = headers::CLIENT_KEYS.iter().any(|name| header(name).is_some());
        let (request_id, replaced) = request::request_id(header(REQUEST_ID));
        if replaced {
            // Envoy answers with the request's header as it is now (`always_set_request_id_in_response`).
            host.set_header(REQUEST_HEADERS, REQUEST_ID, &request_id);
        }
        self.request_id = request_id;
        let method = header(":method").unwrap_or_default();
        let path = header(":path").unwrap_or_default();
        self.api = ClientApi::of_path(path);
        let content_type = header("content-type");
        let content_length = header("content-length");
        let (authorization, api_key) = if self.router.client_keys().required() && on_behalf_of.is_none() {
            // Azure OpenAI's SDKs send `api-key`; Anthropic's `x-api-key`, taken only when neither came.
            let authorization = header("authorization");
            let api_key = match (authorization, header("api-key")) {
                (None, None) => header("x-api-key"),
                (_, api_key) => api_key,
            };
            (authorization, api_key)
        } else {
            (None, None)
        };
        let head = RequestHead {
            method: &String::from_utf8_lossy(method),
            path: &String::from_utf8_lossy(path),
            content_type,
            content_length,
            end_of_stream,
            presented: Presented { authorization, api_key },
            on_behalf_of,
        };
        match request::on_request_headers(&self.router, head) {
            HeadersVerdict::PassThrough => Action::Continue,
            HeadersVerdict::BatchService(caller) => match self.router.batches() {
                Some(batches) => self.send_to_service(host, &batches.cluster.clone(), &caller),
                None => Action::Continue,
            },
            HeadersVerdict::PoolOperation(caller) => match self.router.pools() {
                Some(pools) => self.send_to_service(host, &pools.cluster.clone(), &caller),
                None => Action::Continue,
            },
            HeadersVerdict::AskPoolModels(query) => self.ask_pool_models(host, query),
            HeadersVerdict::ReadBody(caller, endpoint) => {
                self.counts_usage = endpoint.is_completion();
                self.endpoint = endpoint;
                self.phase = Phase::ReadingBody { caller, endpoint, buffered: 0 };
                if self.router.cache().is_some() {
                    self.cache_control = gate::cache_control(header("cache-control"));
                }
                if self.router.idempotency().is_some() && head.method == "POST" {
                    if let Some(key) = header(IDEMPOTENCY_KEY_HEADER) {
                        match gate::idempotency_key(key) {
                            Ok(key) => self.idempotency_key = Some(key),
                            Err(error) => return self.refuse_unread(host, &error.into()),
                        }
                    }
                }
                Action::Pause
            }
            HeadersVerdict::Respond(reply) => self.respond(host, &reply),
        }
    }

    pub fn on_request_body<H: Host>(&mut self, host: &H, body_size: usize, end_of_stream: bool) -> Action {
        if let Phase::Service = self.phase {
            // Each piece goes on as it comes: an upload is never held in the VM.
            return Action::Continue;
        }
        if let Some(reply) = request::body_too_large(&self.router, body_size) {
            return self.refuse_unread(host, &reply);
        }
        match &mut self.phase {
            Phase::ReadingBody { buffered, .. } if !end_of_stream => *buffered = body_size,
            Phase::Unrouted { buffered } => *buffered = (!end_of_stream).then_some(body_size),
            _ => {}
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.on_body_read(host, body_size)
    }

    /// A body followed by trailers (HTTP/2 allows it) ends with them: its last piece came without end_of_stream.
    pub fn on_request_trailers<H: Host>(&mut self, host: &H) -> Action {
        let buffered = match &mut self.phase {
            Phase::ReadingBody { buffered, .. } => Some(*buffered),
            Phase::Unrouted { buffered } => buffered.take(),
            _ => None,
        };
        match buffered {
            Some(body_size) => self.on_body_read(host, body_size),
            None => Action::Continue,
        }
    }

    /// The answer to the call the request or its answer is held for.
    pub fn on_call_answer<H: Host>(&mut self, host: &H, num_headers: usize, body_size: usize) {
        match &mut self.phase {
            Phase::AwaitingSharedLimits(_) => self.on_shared_verdict(host, num_headers, body_size),
            Phase::AwaitingPoolModels(_) => self.on_pool_models(host, num_headers, body_size),
            Phase::AwaitingGate(_) => self.on_gate_verdict(host, num_headers, body_size),
            Phase::Forwarded(Forwarded { gated: Some(passed), .. }) if passed.end_held => {
                passed.end_held = false;
                self.on_store_answer(host, num_headers);
            }
            _ => {}
        }
    }

    /// The store took the kept answer, or did not in time: the answer's end leaves either way.
    fn on_store_answer<H: Host>(&mut self, host: &H, num_headers: usize) {
        if host.http_call_header(num_headers, ":status").as_deref() != Some(b"204") {
            if let Some(metric) = self.gate.store_failures {
                host.count(metric);
            }
            host.log_error("modelgate: ext-proc's gate store did not take an answer in time; it went on unkept");
        }
        host.resume_response();
    }

    /// What ext-proc said pools discovered: the held `/v1/models` is answered,
    /// from configuration alone if it said nothing.
    fn on_pool_models<H: Host>(&mut self, host: &H, num_headers: usize, body_size: usize) {
        let Phase::AwaitingPoolModels(query) = std::mem::replace(&mut self.phase, Phase::Unrouted { buffered: None })
        else {
            return;
        };
        let status = host.http_call_header(num_headers, ":status");
        let answer = host.body(BufferType::HttpCallResponseBody, body_size);
        let discovered = request::pool_models(status.as_deref(), &answer);
        if discovered.is_none() {
            host.log_error(
                "modelgate: ext-proc's admin port did not say which models pools serve; /v1/models lists the configured ones",
            );
        }
        self.respond(host, &request::models_reply(&self.router, &query, discovered.as_ref()));
    }

    /// Asks ext-proc's admin port which models pools discovered, holding the
    /// `/v1/models` request; answered from configuration if the call cannot be made.
    fn ask_pool_models<H: Host>(&mut self, host: &H, query: ModelsQuery) -> Action {
        let Some(pools) = self.router.pools() else {
            return self.respond(host, &request::models_reply(&self.router, &query, None));
        };
        let call = admin_call_headers("GET", POOL_MODELS_PATH, "application/json", self.router.internal_token());
        if host.dispatch(&pools.cluster, call, b"", POOL_MODELS_TIMEOUT).is_none() {
            host.log_error(
                "modelgate: could not ask ext-proc's admin port which models pools serve; /v1/models lists the configured ones",
            );
            return self.respond(host, &request::models_reply(&self.router, &query, None));
        }
        self.phase = Phase::AwaitingPoolModels(query);
        Action::Pause
    }

    /// The shared store's verdict on a held request.
    pub fn on_shared_verdict<H: Host>(&mut self, host: &H, num_headers: usize, body_size: usize) {
        let held = match std::mem::replace(&mut self.phase, Phase::Unrouted { buffered: None }) {
            Phase::AwaitingSharedLimits(held) => held,
            other => {
                self.phase = other;
                return;
            }
        };
        // Envoy still holds the request body it buffered for the filter.
        let body = host.body(BufferType::HttpRequestBody, held.body_len);
        let status = host.http_call_header(num_headers, ":status");
        let answer = host.body(BufferType::HttpCallResponseBody, body_size);
        let verdicts = request::shared_verdicts(&held.buckets, status.as_deref(), &answer);
        // The request's headers and body are changed before it resumes: once resumed, Envoy no longer lets them be.
        if self.decide_shared(host, held, verdicts, &body) == Action::Continue {
            host.resume_request();
        }
    }

    pub fn on_response_headers<H: Host>(&mut self, host: &H, end_of_stream: bool) -> Action {
        if let Some(ms) = self.processing_ms(host) {
            host.set_header(RESPONSE_HEADERS, PROCESSING_MS, &ms);
        }
        let mut relayed_details = None;
        if let Phase::Forwarded(forwarded) = &self.phase {
            for (name, value) in limits::headers(&forwarded.admission) {
                host.set_header(RESPONSE_HEADERS, name, &value);
            }
            if forwarded.gated.as_ref().is_some_and(|gated| gated.cache_miss) {
                host.set_header(RESPONSE_HEADERS, CACHE_HEADER, "miss");
            }
            // The inner listener's reason, for this filter only: never sent on to the client.
            if forwarded.guarded {
                relayed_details = host.header(RESPONSE_HEADERS, headers::CODE_DETAILS);
                host.remove_header(RESPONSE_HEADERS, headers::CODE_DETAILS);
            }
        }
        if let Phase::Forwarded(Forwarded { answer, .. }) = &mut self.phase {
            // The guard's word that it reads the usage and sends the trailer, which the client never gets.
            let announced = |trailer: Vec<u8>| trailer == headers::USAGE_TRAILER.as_bytes();
            if answer.asked_guard() && host.header(RESPONSE_HEADERS, "trailer").is_some_and(announced) {
                answer.from_trailer();
                host.remove_header(RESPONSE_HEADERS, "trailer");
            }
        }
        if let Response::Replied { .. } = self.response {
            return Action::Continue;
        }
        let backends = host
            .header(RESPONSE_HEADERS, ":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
            .unwrap_or(200);
        // Here, not in ext_proc, for a whole translated answer: ext_proc takes only its body.
        let status = self.api.answer_status(backends);
        if status != backends {
            host.set_header(RESPONSE_HEADERS, ":status", &status.to_string());
        }
        self.response = Response::Passing { status };
        let forwarded = match &mut self.phase {
            Phase::Forwarded(forwarded) => Some(forwarded),
            _ => None,
        };
        if let Some(forwarded) = forwarded {
            if let Some(keep) = forwarded.gated.as_mut().and_then(|gated| gated.keep.as_mut()) {
                let content_type = host.header(RESPONSE_HEADERS, "content-type");
                keep.on_headers(
                    status,
                    content_type.as_deref(),
                    host.header(RESPONSE_HEADERS, "content-encoding").as_deref(),
                );
            }
            // A fallback chain may have been answered by another backend than the first.
            if self.router.accounting().is_some() {
                if let Some(backend) = host.header(RESPONSE_HEADERS, headers::SERVED_BY) {
                    forwarded.backend = String::from_utf8_lossy(&backend).into_owned();
                }
            }
        }
        if status < 400 {
            // A model's answer with nothing in it is a broken backend, not a success.
            if let (true, Phase::Forwarded(forwarded)) =
                (end_of_stream && (200..300).contains(&status), &mut self.phase)
            {
                forwarded.answer.failed();
                let error = GatewayError::bad_answer("a success and an empty body");
                return self.respond(host, &Reply::from(error));
            }
            let holds = matches!(&self.phase, Phase::Forwarded(f) if f.holds_translated_headers) && !end_of_stream;
            return if holds { Action::Pause } else { Action::Continue };
        }
        if let Phase::Forwarded(forwarded) = &mut self.phase {
            forwarded.answer.failed();
        }
        let details = code_details(host, relayed_details);
        // A fallback chain's retries: the route says how many attempts were made.
        let attempts = host
            .header(RESPONSE_HEADERS, headers::ATTEMPTS)
            .and_then(|n| std::str::from_utf8(&n).ok()?.parse::<u32>().ok())
            .unwrap_or(1);
        if end_of_stream {
            // No body will follow to rewrite: answer anew with the envelope.
            let origin = Origin::from_code_details(&details).after_attempts(attempts);
            return match normalize_in(self.api, status, origin, b"") {
                Some(rewritten) => self.respond(host, &Reply::rewritten(status, rewritten)),
                None => Action::Continue,
            };
        }
        let encoding = host
            .header(RESPONSE_HEADERS, "content-encoding")
            .map(|e| String::from_utf8_lossy(&e).into_owned())
            .filter(|e| !e.eq_ignore_ascii_case("identity"));
        self.response = Response::Rewriting(Failed { status, details, attempts, encoding, held: 0 });
        host.remove_header(RESPONSE_HEADERS, "content-length");
        Action::Pause
    }

    pub fn on_response_body<H: Host>(&mut self, host: &H, body_size: usize, end_of_stream: bool) -> Action {
        let Response::Rewriting(failed) = &mut self.response else {
            if let Phase::Forwarded(Forwarded { answer, gated, .. }) = &mut self.phase {
                let keep = gated.as_mut().and_then(|gated| gated.keep.as_mut());
                let keeps = keep.as_ref().is_some_and(|keep| keep.wants_bytes());
                // The body is read only where usage is counted or the answer kept, and only a piece read is timed.
                let piece = if answer.reads_body() || keeps {
                    host.body(BufferType::HttpResponseBody, body_size)
                } else {
                    Vec::new()
                };
                if answer.awaits_trailer() && body_size > 0 {
                    answer.on_unread_piece(|| host.now_us());
                }
                let changed = answer.on_piece(|| host.now_us(), &piece, end_of_stream);
                if let Some(changed) = &changed {
                    host.replace_body(BufferType::HttpResponseBody, body_size, changed);
                }
                if let (Some(keep), true) = (keep, keeps) {
                    // What the client gets, after the unasked usage chunk is gone.
                    keep.add(changed.as_deref().unwrap_or(&piece));
                }
            }
            if end_of_stream {
                if matches!(&self.phase, Phase::Forwarded(Forwarded { answer, .. }) if answer.awaits_trailer()) {
                    host.log_error("the stream guard announced a usage trailer and ended the stream without it");
                }
                return self.answer_ended(host);
            }
            return Action::Continue;
        };
        if !end_of_stream {
            failed.held = body_size;
            return Action::Pause;
        }
        self.rewrite_failed(host, body_size)
    }

    /// Rewrites an error answer held whole (`body_size` bytes) as an error in
    /// the client's API, and lets it go.
    fn rewrite_failed<H: Host>(&self, host: &H, body_size: usize) -> Action {
        let Response::Rewriting(Failed { status, details, attempts, encoding, .. }) = &self.response else {
            return Action::Continue;
        };
        let body = host.body(BufferType::HttpResponseBody, body_size);
        // A compressed body is not read: it is always replaced, by a body that is not compressed.
        let readable =
            encoding.as_deref().map_or(Cow::Borrowed(body.as_slice()), |e| error_normalize::compressed_body(e).into());
        let origin = Origin::from_code_details(details).after_attempts(*attempts);
        let length = match normalize_in(self.api, *status, origin, &readable) {
            Some(rewritten) => {
                host.replace_body(BufferType::HttpResponseBody, body_size, &rewritten.body);
                host.set_header(RESPONSE_HEADERS, "content-type", "application/json");
                host.remove_header(RESPONSE_HEADERS, "content-encoding");
                if let Some((name, value)) = retry_header(rewritten.should_retry) {
                    host.set_header(RESPONSE_HEADERS, name, value);
                }
                rewritten.body.len()
            }
            None => body.len(),
        };
        host.set_header(RESPONSE_HEADERS, "content-length", &length.to_string());
        Action::Continue
    }

    /// An answer's end in trailers: an error answer's held body rewritten,
    /// or a guarded stream's usage trailer taken out.
    pub fn on_response_trailers<H: Host>(&mut self, host: &H) -> Action {
        if let Response::Rewriting(Failed { held, .. }) = &self.response {
            return self.rewrite_failed(host, *held);
        }
        if let Phase::Forwarded(Forwarded { answer, .. }) = &mut self.phase {
            if answer.awaits_trailer() {
                if let Some(value) = host.header(RESPONSE_TRAILERS, headers::USAGE_TRAILER) {
                    host.remove_header(RESPONSE_TRAILERS, headers::USAGE_TRAILER);
                    answer.on_trailer(&value, host.now_us());
                }
            }
        }
        self.answer_ended(host)
    }

    /// The answer ended whole, with its last piece or its trailers: that end
    /// is held while the store takes a kept answer.
    fn answer_ended<H: Host>(&mut self, host: &H) -> Action {
        let held = self.hand_over_answer(host, true);
        // Before the answer's end leaves: the client's next request sees these tokens settled.
        self.settle_tokens(host);
        if held {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    /// The request is over: its tokens are settled in the key's token
    /// limits, and, where usage is kept, its usage record is handed to this
    /// worker's outbox, or, refused before any backend (or left by its
    /// client before one), it is counted with the worker's refusals.
    pub fn on_log<H: Host>(&mut self, host: &H) {
        // An answer not handed over by now did not end whole: its claim is let go.
        self.hand_over_answer(host, false);
        self.settle_tokens(host);
        if self.router.accounting().is_none() {
            return;
        }
        let status = self.response.status();
        if let Phase::Replayed(replayed) = &self.phase {
            let record = UsageRecord {
                at_ms: host.now_us() / 1000,
                stream: replayed.stream,
                usage: replayed.usage,
                latency_us: host.now_us().saturating_sub(self.started_us),
                served_from: Some(replayed.source),
                ..UsageRecord::default()
            };
            let finished = request::Finished {
                request_id: &self.request_id,
                key: key_name(&replayed.caller),
                model: &replayed.model,
                exact_route: replayed.exact_route,
                backend: &replayed.backend,
                // Served from the store: it costs nothing.
                price: None,
                status,
                traffic: self.traffic,
            };
            self.outbox.push(&request::usage_record(record, finished));
            return;
        }
        if let Phase::Forwarded(forwarded) = &mut self.phase {
            let finished = request::Finished {
                request_id: &self.request_id,
                key: key_name(&forwarded.caller),
                model: &forwarded.model,
                exact_route: forwarded.exact_route,
                backend: &forwarded.backend,
                price: forwarded.price.as_ref(),
                status,
                traffic: self.traffic,
            };
            let ended_us = forwarded.answer.ended_us().unwrap_or_else(|| host.now_us());
            let mut record = request::usage_record(forwarded.answer.record(ended_us), finished);
            record.budget_reservation = forwarded.gated.as_ref().and_then(|gated| gated.budget_reservation.clone());
            self.outbox.push(&record);
            return;
        }
        let (key, model, exact_route) = match &self.phase {
            Phase::Unrouted { .. }
            | Phase::Service
            | Phase::AwaitingPoolModels(_)
            | Phase::Forwarded(_)
            | Phase::Replayed(_) => return,
            Phase::ReadingBody { caller, .. } => (key_name(caller), "", false),
            Phase::AwaitingSharedLimits(held) => {
                (held.caller.name.as_str(), held.routing.model.as_str(), held.routing.exact_route)
            }
            Phase::AwaitingGate(gated) => {
                // Its client left while the gate decided: the gate may reserve, and no record will settle.
                if gated.budgets {
                    self.outbox.release(gated.reservation.clone());
                }
                (key_name(&gated.admitted.caller), gated.routing.model.as_str(), gated.routing.exact_route)
            }
            Phase::Refused { caller, model, exact_route } => (key_name(caller), model.as_str(), *exact_route),
        };
        let finished = request::Finished {
            key,
            model,
            exact_route,
            status,
            traffic: self.traffic,
            ..request::Finished::default()
        };
        self.outbox.refuse(request::refused(finished));
    }

    /// Routes (or refuses) a request once its whole body is buffered.
    fn on_body_read<H: Host>(&mut self, host: &H, body_size: usize) -> Action {
        let body = host.body(BufferType::HttpRequestBody, body_size);
        let (caller, endpoint) = match &self.phase {
            Phase::ReadingBody { caller, endpoint, .. } => (caller.as_deref(), *endpoint),
            // Not a model-routed request: its body is checked as a chat completion's.
            _ => (None, Endpoint::ChatCompletions),
        };
        match request::on_request_body(&self.router, &body, caller, endpoint) {
            Ok(routing) => match std::mem::replace(&mut self.phase, Phase::Unrouted { buffered: None }) {
                Phase::ReadingBody { caller, .. } => self.route(host, caller, routing, &body),
                other => {
                    // Not a model-routed request: nothing to route.
                    self.phase = other;
                    Action::Continue
                }
            },
            Err(reply) => self.refuse_unread(host, &reply),
        }
    }

    fn processing_ms<H: Host>(&self, host: &H) -> Option<String> {
        let now_us = host.now_us();
        (self.started_us > 0 && now_us >= self.started_us).then(|| ((now_us - self.started_us) / 1000).to_string())
    }

    /// Settles what the answer used with what the request reserved in the
    /// key's token limits, once: at the answer's end, or when the request
    /// ends without one. An error answer used nothing; an answer whose usage
    /// is unknown (a stream the client left) keeps its reservation. Shared
    /// limits are settled with this worker's next batch.
    fn settle_tokens<H: Host>(&mut self, host: &H) {
        let Phase::Forwarded(forwarded) = &mut self.phase else {
            return;
        };
        if forwarded.reserved.is_empty() {
            return;
        }
        let used =
            if self.response.status() >= 400 { Some(0) } else { forwarded.answer.usage().map(|usage| usage.total()) };
        // Settled: nothing is left to settle twice.
        let reserved = std::mem::take(&mut forwarded.reserved);
        self.settle(host, &reserved, used);
    }

    /// Settles `reserved` tokens with those `used` (`None`: unknown, the reservation stands).
    fn settle<H: Host>(&self, host: &H, reserved: &[Reserved], used: Option<u64>) {
        if reserved.is_empty() {
            return;
        }
        if self.router.shared_limits().is_some() {
            self.outbox.settle(reserved, used, host.now_us());
        } else {
            limits::settle(&SharedBuckets(host), reserved, used, host.now_us());
        }
    }

    /// Sends a routed request on to its backend, once its key's limits admit
    /// it: counted here, or asked of the shared store (and then held until it answers).
    fn route<H: Host>(&mut self, host: &H, caller: Caller, routing: Routing, body: &[u8]) -> Action {
        let Some(key) = caller else {
            return self.forward(host, Admitted::unlimited(None), routing, body);
        };
        let mut buckets = key.limits.buckets(&key.name, &routing.model);
        if !self.counts_usage {
            buckets.retain(|bucket| bucket.unit != Unit::Tokens);
        }
        if buckets.is_empty() {
            return self.forward(host, Admitted::unlimited(Some(key)), routing, body);
        }
        let reserved_tokens = match request::reservation(&self.router, &key, &buckets, &routing.model, routing.tokens) {
            Ok(tokens) => tokens,
            Err(reply) => return self.refuse(host, Some(key), routing, &reply),
        };
        let Some(shared) = self.router.shared_limits() else {
            let now = host.now_us();
            let limited =
                request::rate_limit(&key, &buckets, &routing.model, reserved_tokens, &SharedBuckets(host), now);
            return match limited {
                Ok((admission, reserved)) => {
                    self.forward(host, Admitted::new(key, &buckets, admission, reserved), routing, body)
                }
                Err(reply) => self.refuse(host, Some(key), routing, &reply),
            };
        };
        let call = serde_json::to_vec(&Bucket::admission(&buckets, reserved_tokens)).unwrap_or_default();
        let call_headers = admin_call_headers("POST", SPEND_PATH, "application/json", self.router.internal_token());
        // Asked before the store's clock starts the reservation: it is taken to refill no later than it does.
        let asked_us = host.now_us();
        let sent = host.dispatch(&shared.cluster, call_headers, &call, Duration::from_millis(shared.timeout_ms));
        let held = Held { caller: key, routing, buckets, body_len: body.len(), reserved_tokens, asked_us };
        if sent.is_some() {
            self.phase = Phase::AwaitingSharedLimits(held);
            return Action::Pause;
        }
        self.decide_shared(host, held, None, body)
    }

    /// Forwards or refuses a request on the shared store's verdicts (`None`
    /// when it gave none): `Continue` once forwarded.
    fn decide_shared<H: Host>(&mut self, host: &H, held: Held, verdicts: Option<Vec<Verdict>>, body: &[u8]) -> Action {
        let Held { caller, routing, buckets, reserved_tokens, asked_us, .. } = held;
        let judged = match verdicts {
            Some(verdicts) => request::judge(&caller, &routing.model, &buckets, &verdicts, reserved_tokens, asked_us),
            None => {
                if let Some(metric) = self.store_failures {
                    host.count(metric);
                }
                host.log_error("modelgate: the shared rate-limit store gave no verdict (see ext-proc's log)");
                request::without_shared_store(self.router.shared_limits().map(|s| s.on_failure).unwrap_or_default())
                    // Let through unlimited: it holds nothing, and its usage is charged once known.
                    .map(|admission| (admission, limits::unreserved(&buckets, asked_us)))
            }
        };
        match judged {
            Ok((admission, reserved)) => {
                self.forward(host, Admitted::new(caller, &buckets, admission, reserved), routing, body)
            }
            Err(reply) => self.refuse(host, Some(caller), routing, &reply),
        }
    }

    /// Sends an admitted request on to its backend, or first asks the gate
    /// where its route caches answers, it carries an `Idempotency-Key`, or
    /// its key has budgets: `Continue` once forwarded.
    fn forward<H: Host>(&mut self, host: &H, admitted: Admitted, routing: Routing, body: &[u8]) -> Action {
        // The one branch a gateway without a cache or budgets pays.
        if self.router.cache().is_none() && self.router.budgets().is_none() {
            return self.send_on(host, admitted, routing, body, Passed::default());
        }
        let router = Rc::clone(&self.router);
        let Some(target) = router.resolve(&routing.model) else {
            return self.send_on(host, admitted, routing, body, Passed::default());
        };
        let cache = gate::route_cache(target, self.endpoint).map(|cache| {
            let (lookup, store) = self.cache_control;
            CacheAsk { ttl_secs: cache.ttl_secs, mode: cache.mode, shared: cache.shared, lookup, store }
        });
        let idempotency = self
            .idempotency_key
            .take()
            .zip(router.idempotency())
            .map(|(key, config)| IdempotencyAsk { key, window_secs: config.window_secs });
        // A worker's own copy answers an exact repeat; a request that claims an
        // `Idempotency-Key` goes to the gate, which alone records the claim.
        let copy_key = cache.as_ref().filter(|_| idempotency.is_none() && gate::keeps_copies(&router)).map(|asked| {
            let partition = replay::partition(asked.shared, key_name(&admitted.caller));
            replay::local_key(&partition, self.endpoint.path(), &routing.model, body)
        });
        if let (Some(key), Some(asked)) = (&copy_key, &cache) {
            if !asked.lookup {
                self.gate.forget_copy(key);
            } else if let Some(copy) = self.gate.copy(key, host.now_us() / 1000) {
                if let Some(metric) = self.gate.local_hits {
                    host.count(metric);
                }
                let LocalCopy { status, content_type, usage, bytes } = copy;
                return self.replay(
                    host,
                    admitted,
                    routing,
                    ReplaySource::Cache,
                    (status, &content_type, usage),
                    &bytes,
                );
            }
        }
        // An endpoint whose answer has no usage (`/tokenize`) costs nothing to reserve.
        let candidates = if self.counts_usage {
            gate::budget_candidates(&router, key_name(&admitted.caller), target, &routing)
        } else {
            Vec::new()
        };
        let fallback = target.on_budget_exhausted == modelgate_proto::config::OnBudgetExhausted::Fallback;
        let (Some(mut ask), Some((cluster, timeout))) =
            (gate::ask(cache, idempotency, candidates, fallback), gate::call_target(&router))
        else {
            return self.send_on(host, admitted, routing, body, Passed::default());
        };
        let budgets = !ask.budgets.is_empty();
        ask.request_id = self.request_id.clone();
        ask.owner = key_name(&admitted.caller).to_string();
        ask.path = self.endpoint.path().to_string();
        ask.model = routing.model.clone();
        ask.timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        if budgets {
            ask.reservation = self.gate.reservation_id(self.started_us);
        }
        let call = admin_call_headers("POST", GATE_PATH, "application/json", router.internal_token());
        let gated = Gated {
            cache: ask.cache.is_some(),
            copy_key: copy_key.filter(|_| ask.cache.as_ref().is_some_and(|asked| asked.store)),
            reservation: ask.reservation.clone(),
            budgets,
            admitted,
            routing,
            body_len: body.len(),
        };
        if host.dispatch(&cluster, call, &ask.to_call_body(body), timeout).is_some() {
            self.phase = Phase::AwaitingGate(Box::new(gated));
            return Action::Pause;
        }
        self.without_verdict(host, gated, body)
    }

    /// The gate's verdict on a held request, carried out.
    fn on_gate_verdict<H: Host>(&mut self, host: &H, num_headers: usize, body_size: usize) {
        let Phase::AwaitingGate(gated) = std::mem::replace(&mut self.phase, Phase::Unrouted { buffered: None }) else {
            return;
        };
        let status = host.http_call_header(num_headers, ":status");
        let answer = host.body(BufferType::HttpCallResponseBody, body_size);
        // Envoy still holds the request body it buffered for the filter.
        let body = host.body(BufferType::HttpRequestBody, gated.body_len);
        let action = match gate::verdict(status.as_deref(), &answer) {
            Some((verdict, bytes)) => self.carry_out(host, *gated, verdict, bytes, &body),
            None => self.without_verdict(host, *gated, &body),
        };
        if action == Action::Continue {
            host.resume_request();
        }
    }

    fn carry_out<H: Host>(
        &mut self,
        host: &H,
        gated: Gated,
        verdict: GateVerdict,
        bytes: &[u8],
        body: &[u8],
    ) -> Action {
        let Gated { admitted, mut routing, budgets, reservation, copy_key, .. } = gated;
        match verdict {
            GateVerdict::Proceed { member, ticket, cache_miss } => {
                if member > 0 && !self.start_at(&mut routing, member) {
                    host.log_error(
                        "modelgate: the gate chose a backend the model's route does not have; its first is tried",
                    );
                }
                let max_bytes = self.router.cache().map_or(0, |c| c.max_entry_bytes);
                let passed = Passed {
                    keep: ticket.map(|ticket| Keep::new(ticket, max_bytes)),
                    cache_miss,
                    budget_reservation: budgets.then_some(reservation),
                    end_held: false,
                };
                self.send_on(host, admitted, routing, body, passed)
            }
            GateVerdict::Replay { source, status, content_type, usage, ttl_ms } => {
                if let Some(key) = copy_key.filter(|_| source == ReplaySource::Cache && ttl_ms > 0) {
                    let copy = LocalCopy { status, content_type: content_type.clone(), usage, bytes: bytes.into() };
                    self.gate.keep_copy(&key, copy, (host.now_us() / 1000).saturating_add(ttl_ms));
                }
                self.replay(host, admitted, routing, source, (status, &content_type, usage), bytes)
            }
            GateVerdict::Refuse { refusal } => {
                self.settle(host, &admitted.reserved, Some(0));
                self.refuse(host, admitted.caller, routing, &gate::refusal(&refusal))
            }
        }
    }

    /// Answers with a kept answer (`head`: its status, content type and usage) instead of the backend.
    fn replay<H: Host>(
        &mut self,
        host: &H,
        admitted: Admitted,
        routing: Routing,
        source: ReplaySource,
        head: (u16, &str, Option<Usage>),
        bytes: &[u8],
    ) -> Action {
        let (status, content_type, usage) = head;
        let used = gate::replay_settles(&self.router, source, usage);
        self.settle(host, &admitted.reserved, Some(used));
        self.phase = Phase::Replayed(Replayed {
            caller: admitted.caller,
            model: routing.model,
            exact_route: routing.exact_route,
            backend: routing.backend,
            stream: routing.stream,
            source,
            usage,
        });
        let marker = match source {
            ReplaySource::Cache => (CACHE_HEADER, "hit"),
            ReplaySource::Idempotency => (REPLAYED_HEADER, "true"),
        };
        self.response = Response::Replied { status };
        let processing_ms = self.processing_ms(host).unwrap_or_default();
        let limits = limits::headers(&admitted.admission);
        let mut headers = vec![("content-type", content_type), (PROCESSING_MS, processing_ms.as_str()), marker];
        headers.extend(limits.iter().map(|(name, value)| (*name, value.as_str())));
        host.send_response(status, headers, bytes);
        Action::Pause
    }

    /// A request the gate gave no verdict on: counted and logged; with
    /// budgets, refused or let through as configured; otherwise a cache miss
    /// that keeps nothing.
    fn without_verdict<H: Host>(&mut self, host: &H, gated: Gated, body: &[u8]) -> Action {
        if let Some(metric) = self.gate.store_failures {
            host.count(metric);
        }
        host.log_error("modelgate: ext-proc's gate gave no verdict (see ext-proc's log)");
        let Gated { admitted, routing, budgets, cache, reservation, .. } = gated;
        match gate::without_verdict(&self.router, budgets) {
            Ok(()) => {
                // The record still names the reservation: had the store made it after all, the
                // record settles it, and had it not, the store refuses to make it later.
                let passed = Passed {
                    cache_miss: cache,
                    budget_reservation: budgets.then_some(reservation),
                    ..Passed::default()
                };
                self.send_on(host, admitted, routing, body, passed)
            }
            Err(reply) => {
                // Had the store made the reservation after all, no record would settle it.
                self.outbox.release(reservation);
                self.settle(host, &admitted.reserved, Some(0));
                self.refuse(host, admitted.caller, routing, &reply)
            }
        }
    }

    /// Moves a request for a model with fallbacks to start at chain `member`,
    /// whose budgets admitted it: false if the route has no such member.
    fn start_at(&self, routing: &mut Routing, member: usize) -> bool {
        let Some(target) = self.router.resolve(&routing.model) else {
            return false;
        };
        let (Some(chain), Some(candidate)) = (target.chain_from(member, routing.stream), target.members.get(member))
        else {
            return false;
        };
        routing.chain = Some(chain.to_string());
        routing.backend = candidate.backend.clone();
        routing.price = candidate.price;
        true
    }

    /// Hands the answer kept for the gate's store over, once: whole where it
    /// `ended` a success within its bound, else only to let its claim go.
    /// The call outlives the request. Whether the answer's end is held until
    /// the store answers: so that a client's repeat, once it has the answer,
    /// is a hit (or its idempotent replay) and not a second miss.
    fn hand_over_answer<H: Host>(&mut self, host: &H, ended: bool) -> bool {
        let Phase::Forwarded(forwarded) = &mut self.phase else {
            return false;
        };
        let Some(keep) = forwarded.gated.as_mut().and_then(|gated| gated.keep.take()) else {
            return false;
        };
        let Some(call) = keep.into_call(&self.request_id, ended, forwarded.stream, forwarded.answer.usage()) else {
            return false;
        };
        let Some(cache) = self.router.cache() else {
            return false;
        };
        let headers = admin_call_headers("POST", GATE_STORE_PATH, "application/x-ndjson", self.router.internal_token());
        if !host.dispatch_detached(&cache.cluster, headers, &call, Duration::from_millis(cache.timeout_ms)) {
            if let Some(metric) = self.gate.store_failures {
                host.count(metric);
            }
            host.log_error("modelgate: could not hand an answer to ext-proc's gate store");
            return false;
        }
        if let (true, Some(passed)) = (ended, forwarded.gated.as_mut()) {
            passed.end_held = true;
        }
        ended
    }

    /// Sends an admitted request on to its backend: routing headers, and the body as the backend gets it.
    fn send_on<H: Host>(
        &mut self,
        host: &H,
        admitted: Admitted,
        routing: Routing,
        body: &[u8],
        passed: Passed,
    ) -> Action {
        let count_tokens = self.counts_usage && (self.router.accounting().is_some() || admitted.limits_tokens);
        if count_tokens || passed.keep.is_some() {
            // A compressed answer's usage could not be read, nor its usage chunk removed, nor the answer kept.
            host.remove_header(REQUEST_HEADERS, "accept-encoding");
        }
        if !routing.body_edits.is_empty() {
            let edited = request::edited(body, &routing.body_edits);
            host.replace_body(BufferType::HttpRequestBody, body.len(), &edited);
            host.set_header(REQUEST_HEADERS, "content-length", &edited.len().to_string());
        }
        // Envoy clears the route cache itself when a wasm filter changes request
        // headers, so the route table sees the cluster header (the tests prove it).
        host.set_header(REQUEST_HEADERS, headers::CLUSTER, &routing.cluster);
        for (name, profile) in routing.profile_headers() {
            host.set_header(REQUEST_HEADERS, name, profile);
        }
        if routing.stores_response {
            host.set_header(REQUEST_HEADERS, headers::OWNER, key_name(&admitted.caller));
        }
        if let Some(chain) = &routing.chain {
            host.set_header(REQUEST_HEADERS, headers::CHAIN, chain);
        }
        if !routing.forwards_client_key && self.presents_key {
            for name in headers::CLIENT_KEYS {
                host.remove_header(REQUEST_HEADERS, name);
            }
        }
        if let Some(cluster) = &routing.stream_cluster {
            host.set_header(REQUEST_HEADERS, headers::STREAM_CLUSTER, cluster);
        }
        let guarded = routing.chain.is_some() || routing.stream_cluster.is_some();
        if let (true, Some(token)) = (guarded, self.router.internal_token()) {
            host.set_header(REQUEST_HEADERS, headers::INTERNAL_TOKEN, token);
        }
        let holds_translated_headers = routing.answer_translated_whole();
        let mut answer = Answer::new(self.started_us, routing.stream, count_tokens, routing.usage_unasked);
        // The stream guard frames every event of a stream it relays: asked, it reads the
        // usage there and gives it in a trailer, and this filter reads no piece of the stream.
        if let Some(asked) = guarded.then(|| answer.ask_guard()).flatten() {
            host.set_header(REQUEST_HEADERS, headers::USAGE, asked);
        }
        self.phase = Phase::Forwarded(Forwarded {
            answer,
            caller: admitted.caller,
            model: routing.model,
            exact_route: routing.exact_route,
            backend: routing.backend,
            price: routing.price,
            reserved: admitted.reserved,
            admission: admitted.admission,
            guarded,
            stream: routing.stream,
            holds_translated_headers,
            gated: (!passed.is_nothing()).then(|| Box::new(passed)),
        });
        Action::Continue
    }

    /// Sends a request on to one of ext-proc's services at `cluster` (the
    /// Files and Batch APIs, pool operations), saying whose it is and proving
    /// it comes from the gateway.
    fn send_to_service<H: Host>(&mut self, host: &H, cluster: &str, caller: &Caller) -> Action {
        host.set_header(REQUEST_HEADERS, headers::CLUSTER, cluster);
        host.set_header(REQUEST_HEADERS, headers::OWNER, key_name(caller));
        if let Some(token) = self.router.internal_token() {
            host.set_header(REQUEST_HEADERS, headers::INTERNAL_TOKEN, token);
        }
        // The service knows the caller by name; the key itself goes no further.
        if self.presents_key {
            for name in headers::CLIENT_KEYS {
                host.remove_header(REQUEST_HEADERS, name);
            }
        }
        self.phase = Phase::Service;
        Action::Continue
    }

    /// Refuses a routed request before any backend.
    fn refuse<H: Host>(&mut self, host: &H, caller: Caller, routing: Routing, reply: &Reply) -> Action {
        self.phase = Phase::Refused { caller, model: routing.model, exact_route: routing.exact_route };
        self.respond(host, reply)
    }

    /// Refuses a request whose body could not be read for its model.
    fn refuse_unread<H: Host>(&mut self, host: &H, reply: &Reply) -> Action {
        if let Phase::ReadingBody { caller, .. } = &mut self.phase {
            self.phase = Phase::Refused { caller: caller.take(), model: String::new(), exact_route: false };
        }
        self.respond(host, reply)
    }

    /// Answers the request from the filter; the answer is an error in the client's API or a models listing.
    fn respond<H: Host>(&mut self, host: &H, reply: &Reply) -> Action {
        let (status, body) = reply.in_api(self.api);
        self.response = Response::Replied { status };
        let processing_ms = self.processing_ms(host).unwrap_or_default();
        let mut response_headers = vec![("content-type", "application/json"), (PROCESSING_MS, processing_ms.as_str())];
        response_headers.extend(reply.headers.iter().map(|(name, value)| (*name, value.as_str())));
        host.send_response(status, response_headers, &body);
        Action::Pause
    }
}

/// The client key's name, if keys are configured.
fn key_name(caller: &Caller) -> &str {
    caller.as_ref().map_or("", |key| key.name.as_str())
}

/// The key a request names in [`headers::ON_BEHALF_OF`], if it also presents
/// the internal `token`: the batch runner's request for one of its batch's lines.
fn on_behalf_of<'a>(header: &impl Fn(&str) -> Option<&'a [u8]>, token: &str) -> Option<&'a [u8]> {
    let presented = header(headers::INTERNAL_TOKEN)?;
    if !is_internal_token(token, presented) {
        return None;
    }
    header(headers::ON_BEHALF_OF)
}

/// A header's first value, as Envoy's own lookup of one header gives it.
fn find_header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_slice())
}

/// Why Envoy answered as it did: `via_upstream` for a backend's answer, or
/// the reason of a local reply. Behind the stream guard, the inner
/// listener's reason is the one that counts.
fn code_details<H: Host>(host: &H, relayed: Option<Vec<u8>>) -> String {
    let details = relayed.or_else(|| host.property(&["response", "code_details"]));
    details.map(|d| String::from_utf8_lossy(&d).into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests;
