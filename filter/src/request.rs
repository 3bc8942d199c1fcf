//! What the filter does with a request, decided without Envoy.
//!
//! The proxy-wasm callbacks in `lib.rs` only read what Envoy hands them, call
//! these functions, and carry out the verdict.

use crate::routing_fields::{read_routing_fields, RoutingFields};
use modelgate_proto::client_api::{self, ClientApi, Passage};
use modelgate_proto::config::{FailureMode, Price};
use modelgate_proto::endpoint::{classify, Endpoint, Target};
use modelgate_proto::error::{retry_header, GatewayError};
use modelgate_proto::error_normalize::Rewritten;
use modelgate_proto::headers;
use modelgate_proto::keys::{may_use, Caller, ClientKey, Presented};
use modelgate_proto::limits::{self, Admission, Bucket, BucketStore, Reserved, TokenEstimate, Unit, Verdict};
use modelgate_proto::models::{self, PoolModels};
use modelgate_proto::routing::Router;
use modelgate_proto::usage::{bounded, is_bounded, Refused, Traffic, UsageRecord};
use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// A complete answer the filter sends itself; the body is always JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    /// The body in OpenAI's shapes.
    pub body: Vec<u8>,
    /// The gateway's own error the reply says, which another client API's envelope says its own way.
    error: Option<GatewayError>,
}

impl Reply {
    fn ok(body: Vec<u8>) -> Self {
        Reply { status: 200, headers: Vec::new(), body, error: None }
    }

    /// An error answer rewritten in the client's API, with the retry advice it carries.
    pub fn rewritten(status: u16, rewritten: Rewritten) -> Self {
        Reply {
            status,
            headers: retry_header(rewritten.should_retry).map(|(k, v)| (k, v.to_string())).into_iter().collect(),
            body: rewritten.body,
            error: None,
        }
    }

    /// The status and body a client of `api` gets: the gateway's own errors in
    /// Anthropic's envelope and statuses on its API.
    pub fn in_api(&self, api: ClientApi) -> (u16, Cow<'_, [u8]>) {
        match (&self.error, api) {
            (Some(error), ClientApi::Anthropic) => (error.status_in(api), Cow::Owned(error.body_in(api))),
            _ => (self.status, Cow::Borrowed(&self.body)),
        }
    }
}

impl From<GatewayError> for Reply {
    /// The filter's own error answers, with the gateway's retry advice.
    fn from(err: GatewayError) -> Self {
        let headers = retry_header(err.should_retry()).map(|(k, v)| (k, v.to_string())).into_iter().collect();
        Reply { status: err.status, headers, body: err.to_json(), error: Some(err) }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum HeadersVerdict {
    /// Not a request the filter handles.
    PassThrough,
    /// A model-routed request from this caller: hold the headers and read the body.
    ReadBody(Caller, Endpoint),
    /// A request to the Files or Batch API from this caller: sent on to the
    /// batch service, its body streamed as it comes.
    BatchService(Caller),
    /// An operation on a self-hosted pool from a caller allowed it: sent on
    /// to ext-proc's pools service, which reads and bounds its body.
    PoolOperation(Caller),
    /// `/v1/models` (or one model, `id`) where pools discover models: answered
    /// once ext-proc says what they serve ([`models_reply`]).
    AskPoolModels(ModelsQuery),
    Respond(Reply),
}

/// A `/v1/models` request waiting for the models pools discovered.
#[derive(Debug, PartialEq, Eq)]
pub struct ModelsQuery {
    pub caller: Caller,
    /// One model's id; `None` for the list.
    pub id: Option<String>,
}

/// Where a model-routed request goes, to be written into its headers.
#[derive(Debug, PartialEq)]
pub struct Routing {
    /// The model the client asked for.
    pub model: String,
    /// An exact route names the model: the name comes from configuration, and may be a label.
    pub exact_route: bool,
    /// The backend's name, for usage records.
    pub backend: String,
    pub price: Option<Price>,
    pub stream: bool,
    /// A stream whose usage the gateway asked for though the client did not:
    /// the usage chunk is removed from the answer.
    pub usage_unasked: bool,
    /// How the request body changes, in the order they lie: the model renamed
    /// for its backend, and the gateway asking for a stream's usage.
    pub body_edits: Vec<BodyEdit>,
    /// The cluster the route sends the request to.
    pub cluster: String,
    /// The backend's profile for ext-proc, when its requests need rewriting.
    pub profile: Option<String>,
    /// The client's API key goes on to the backend.
    pub forwards_client_key: bool,
    /// The backend is a self-hosted pool whose replica ext-proc's picker chooses.
    pub picked: bool,
    /// For a stream sent through the stream guard (then `cluster`): the backend's cluster.
    pub stream_cluster: Option<String>,
    /// For a model with fallbacks: the chain the stream guard tries (then `cluster`).
    pub chain: Option<String>,
    /// The tokens the request may take, where its key's limits count tokens.
    pub tokens: TokenEstimate,
    /// The backend does not serve the client's API (Responses, Messages): ext_proc
    /// translates the request into a chat completion and the answer back, or answers itself.
    pub translated: bool,
    /// A translated Responses request: the response is stored, owned by the client's key.
    pub stores_response: bool,
    /// The backend's answer is translated (by ext_proc, or for a stream the stream guard).
    pub answers_translated: bool,
}

impl Routing {
    /// Where the backend's profile goes: to ext_proc, or for a stream through
    /// the stream guard to the guard, which then rewrites it without ext_proc.
    /// A pool's stream still goes to ext_proc, whose picker names its replica
    /// (and which rewrites it) before the guard relays it.
    pub fn profile_header(&self) -> &'static str {
        if self.stream_cluster.is_some() && !self.picked {
            headers::STREAM_BACKEND
        } else {
            headers::BACKEND
        }
    }

    /// The backend's profile headers. A translated request always engages
    /// ext_proc: with the profile when ext_proc also speaks the backend's
    /// dialect, else with the default profile (the stream guard, or each
    /// member of a chain, speaks it). ext_proc is told too when an answer it
    /// translates will be whole.
    pub fn profile_headers(&self) -> Vec<(&'static str, &str)> {
        let mut sent: Vec<(&'static str, &str)> =
            self.profile.iter().map(|profile| (self.profile_header(), profile.as_str())).collect();
        if self.translated && !sent.iter().any(|(name, _)| *name == headers::BACKEND) {
            sent.push((headers::BACKEND, DEFAULT_PROFILE));
        }
        if self.answer_translated_whole() {
            sent.push((headers::WHOLE_ANSWER, "1"));
        }
        sent
    }

    /// ext_proc translates the answer, which will be whole: it takes the
    /// answer's body alone, with its status, in one message.
    pub fn answer_translated_whole(&self) -> bool {
        self.answers_translated && !self.stream && (self.profile.is_some() || self.translated)
    }
}

/// The profile of a backend whose requests need no rewriting: an OpenAI-dialect backend as it is.
const DEFAULT_PROFILE: &str = "{}";

/// Bytes of a request body to replace.
#[derive(Debug, PartialEq, Eq)]
pub struct BodyEdit {
    pub at: usize,
    pub len: usize,
    pub with: Vec<u8>,
}

/// `body` with `edits` made: each replaces bytes of the original body, and
/// they lie in order without overlapping.
pub fn edited(body: &[u8], edits: &[BodyEdit]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + edits.iter().map(|edit| edit.with.len()).sum::<usize>());
    let mut from = 0;
    for edit in edits {
        out.extend_from_slice(body.get(from..edit.at).unwrap_or_default());
        out.extend_from_slice(&edit.with);
        from = edit.at + edit.len;
    }
    out.extend_from_slice(body.get(from..).unwrap_or_default());
    out
}

/// Asks the backend for a stream's usage chunk (`stream_options.include_usage`),
/// for a body whose `fields` say the client did not. A `stream_options` the
/// client sent is changed in place, keeping its other options; otherwise the
/// member is added last.
fn ask_for_usage(body: &[u8], fields: &RoutingFields) -> Option<BodyEdit> {
    let mut options = fields.stream_options.clone().unwrap_or_default();
    options.insert("include_usage".into(), serde_json::Value::Bool(true));
    let options = serde_json::to_vec(&options).ok()?;
    if let Some(at) = &fields.stream_options_at {
        return Some(BodyEdit { at: at.start, len: at.len(), with: options });
    }
    let mut with = br#","stream_options":"#.to_vec();
    with.extend_from_slice(&options);
    with.push(b'}');
    // The body parsed as an object, so its last byte that is not whitespace closes it.
    let at = body.iter().rposition(|b| !b.is_ascii_whitespace()).filter(|&i| body.get(i) == Some(&b'}'))?;
    Some(BodyEdit { at, len: body.len() - at, with })
}

/// The request headers the filter decides on.
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub content_type: Option<&'a [u8]>,
    pub content_length: Option<&'a [u8]>,
    pub end_of_stream: bool,
    /// The client's key, read only where keys are configured.
    pub presented: Presented<'a>,
    /// The key named by a request the batch runner sends on its behalf,
    /// which proved itself with the internal token: its key is not presented.
    pub on_behalf_of: Option<&'a [u8]>,
}

/// True for a JSON media type; a request that sends none is read as JSON too.
fn is_json(content_type: &[u8]) -> bool {
    let media_type = content_type.split(|&b| b == b';').next().unwrap_or_default();
    media_type.trim_ascii().eq_ignore_ascii_case(b"application/json")
}

/// Decides on the request headers alone: an oversized or non-JSON body is
/// refused before any of it is buffered.
pub fn on_request_headers(router: &Router, head: RequestHead<'_>) -> HeadersVerdict {
    let RequestHead { method, path, content_type, content_length, end_of_stream, presented, on_behalf_of } = head;
    let target = classify(method, path);
    match target {
        Target::WrongMethod(allowed) => {
            let mut reply = Reply::from(GatewayError::method_not_allowed(method, path, allowed));
            reply.headers.push(("allow", allowed.into()));
            return HeadersVerdict::Respond(reply);
        }
        Target::Other => return HeadersVerdict::PassThrough,
        // Without a batch service configured, these paths are Envoy's routes' as they always were.
        Target::BatchService(_) if router.batches().is_none() => return HeadersVerdict::PassThrough,
        Target::PoolOperation(_) if router.pools().is_none() => return HeadersVerdict::PassThrough,
        _ => {}
    }
    let keys = router.client_keys();
    let caller = match on_behalf_of.map_or_else(|| keys.authenticate(presented), |name| keys.on_behalf_of(name)) {
        Ok(caller) => caller,
        Err(e) => return HeadersVerdict::Respond(e.into()),
    };
    match target {
        Target::Other | Target::WrongMethod(_) => HeadersVerdict::PassThrough,
        Target::BatchService(_) => HeadersVerdict::BatchService(caller),
        // An open gateway trusts every caller with these too, as with everything else.
        Target::PoolOperation(endpoint) if keys.required() && !caller.as_ref().is_some_and(|key| key.admin) => {
            let action = match endpoint {
                Endpoint::UnloadLoraAdapter => "unloading a LoRA adapter",
                _ => "loading a LoRA adapter",
            };
            HeadersVerdict::Respond(GatewayError::admin_key_required(action).into())
        }
        Target::PoolOperation(_) => HeadersVerdict::PoolOperation(caller),
        Target::ListModels | Target::RetrieveModel(_) => {
            let id = match target {
                Target::RetrieveModel(id) => Some(id),
                _ => None,
            };
            let query = ModelsQuery { caller, id };
            match router.pools() {
                Some(_) => HeadersVerdict::AskPoolModels(query),
                None => HeadersVerdict::Respond(models_reply(router, &query, None)),
            }
        }
        Target::ModelRouted(endpoint) => {
            let limit = router.max_request_body_bytes();
            let declared =
                content_length.and_then(|v| std::str::from_utf8(v).ok()).and_then(|v| v.trim().parse::<u64>().ok());
            if declared.is_some_and(|len| len > limit as u64) {
                HeadersVerdict::Respond(GatewayError::body_too_large(Some(limit)).into())
            } else if let Some(declared) = content_type.filter(|c| !is_json(c)) {
                HeadersVerdict::Respond(GatewayError::unsupported_media_type(&String::from_utf8_lossy(declared)).into())
            } else if end_of_stream {
                HeadersVerdict::Respond(
                    GatewayError::invalid_request("The request body is empty. The API expects a JSON object.".into())
                        .into(),
                )
            } else {
                HeadersVerdict::ReadBody(caller, endpoint)
            }
        }
    }
}

/// The answer to a `/v1/models` request: the configured models, and those
/// pools `discovered` (`None` when ext-proc did not say).
pub fn models_reply(router: &Router, query: &ModelsQuery, discovered: Option<&PoolModels>) -> Reply {
    let caller = query.caller.as_deref();
    match &query.id {
        None => Reply::ok(models::list_json(router, caller, discovered)),
        Some(id) => match models::retrieve_json(router, id, caller, discovered) {
            Some(body) => Reply::ok(body),
            None => GatewayError::model_not_found(id).into(),
        },
    }
}

/// What ext-proc's admin port answered for the models pools discovered:
/// `None` when it did not (unreachable, failing, garbled).
pub fn pool_models(status: Option<&[u8]>, body: &[u8]) -> Option<PoolModels> {
    if status != Some(b"200") {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// True once the buffered body is over the limit, for bodies without a
/// content-length (chunked uploads).
pub fn body_too_large(router: &Router, buffered: usize) -> Option<Reply> {
    let limit = router.max_request_body_bytes();
    (buffered > limit).then(|| GatewayError::body_too_large(Some(limit)).into())
}

/// Decides on the complete request body of a model-routed request. A model
/// the caller's key may not use is answered as one that does not exist, as
/// OpenAI does: the answer does not tell which models the gateway serves.
/// Where answers' tokens are counted (accounting, or a token limit on the
/// key), a stream asks its backend for usage.
pub fn on_request_body(
    router: &Router,
    body: &[u8],
    caller: Option<&ClientKey>,
    endpoint: Endpoint,
) -> Result<Routing, Reply> {
    let fields = read_routing_fields(body)?;
    let limits_tokens = caller.is_some_and(|key| key.limits.counts_tokens());
    // A budget reserves what the request may spend, from the same estimate.
    let has_budgets = caller.is_some_and(|key| router.key_budgets(&key.name).is_some());
    let counts_tokens = router.accounting().is_some() || limits_tokens;
    // Only chat completions and completions have `stream_options.include_usage`: the
    // Responses and Messages APIs' streams always carry usage, and ext_proc asks for it
    // in the chat completions it translates them into.
    let has_usage_option = matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions);
    let usage_unasked = has_usage_option && fields.stream && counts_tokens && !fields.asks_usage();
    let target = router
        .resolve(&fields.model)
        .filter(|_| may_use(caller, &fields.model))
        .ok_or_else(|| GatewayError::model_not_found(&fields.model))?;
    let translated = target.passage(endpoint) != Passage::Native;
    // Where ext_proc translates, it renames too; a body naming `model` twice is its to collapse.
    let rename = target.rename.as_ref().filter(|_| !translated).zip(fields.model_at.clone());
    let mut body_edits: Vec<BodyEdit> = rename
        .iter()
        .map(|(name, at)| BodyEdit { at: at.start, len: at.len(), with: name.as_bytes().to_vec() })
        .collect();
    if usage_unasked {
        body_edits.extend(ask_for_usage(body, &fields));
        body_edits.sort_by_key(|edit| edit.at);
    }
    // A chain goes to the stream guard whole or streamed; the chain names each backend's cluster.
    let (cluster, stream_cluster) =
        match router.stream_guard_cluster().filter(|_| fields.stream && target.chain.is_none()) {
            Some(guard) => (guard.to_string(), Some(target.cluster.clone())),
            None => (target.cluster.clone(), None),
        };
    Ok(Routing {
        model: fields.model.clone(),
        exact_route: router.names_exactly(&fields.model),
        backend: target.backend.clone(),
        price: target.price,
        stream: fields.stream,
        usage_unasked,
        body_edits,
        cluster,
        profile: if rename.is_some() { None } else { target.profile.clone() },
        forwards_client_key: target.forwards_client_key,
        picked: target.pool.is_some(),
        stream_cluster,
        chain: target.chain.as_ref().map(|chain| chain.for_request(fields.stream).to_owned()),
        tokens: if limits_tokens || has_budgets {
            fields.token_estimate(body, endpoint)
        } else {
            TokenEstimate::default()
        },
        translated,
        stores_response: translated && endpoint == Endpoint::Responses,
        answers_translated: client_api::answers_translated(endpoint, &target.serves),
    })
}

/// The request's id as it goes on: the client's `x-request-id` when it is
/// bounded (as Envoy's own ids are), else a new one, and whether that one
/// must replace the client's header. The id ends up in the answer, the
/// backend's request, logs and usage records, so a client cannot make it
/// long or odd.
pub fn request_id(sent: Option<&[u8]>) -> (String, bool) {
    match sent.and_then(|id| std::str::from_utf8(id).ok()).filter(|id| !id.is_empty() && is_bounded(id)) {
        Some(id) => (id.to_string(), false),
        None => (new_request_id(), true),
    }
}

/// A random UUID (version 4), as Envoy makes request ids.
fn new_request_id() -> String {
    // std seeds `RandomState`'s keys from the host's randomness (WASI's `random_get` in Envoy)
    // and keys each one differently: two keyed hashes give 128 unpredictable bits, no dependency.
    let random = || RandomState::new().build_hasher().finish();
    let bits = (u128::from(random()) << 64 | u128::from(random())) & !(0xf000 << 64) & !(0xc << 60);
    let bits = bits | 0x4000 << 64 | 0x8 << 60;
    let hex = format!("{bits:032x}");
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// What is known of a model-routed request when it ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct Finished<'a> {
    pub request_id: &'a str,
    /// The client key's name, if keys are configured.
    pub key: &'a str,
    pub model: &'a str,
    pub exact_route: bool,
    /// The backend that answered; empty when the request never reached one.
    pub backend: &'a str,
    pub price: Option<&'a Price>,
    /// The status the client got; 0 when it got none (it went away first).
    pub status: u16,
    pub traffic: Traffic,
}

/// The usage record of a request that reached a backend, from its answer's
/// `record`, with every value a client could have chosen bounded. A
/// pattern-routed model name may become a label once a backend answered it.
pub fn usage_record(mut record: UsageRecord, finished: Finished<'_>) -> UsageRecord {
    record.request_id = bounded(finished.request_id).to_string();
    record.key = bounded(finished.key).to_string();
    record.model = bounded(finished.model).to_string();
    record.model_served = finished.exact_route || (200..400).contains(&finished.status);
    record.backend = bounded(finished.backend).to_string();
    record.status = finished.status;
    record.cost_usd = finished.price.zip(record.usage).map(|(price, usage)| usage.cost(price));
    record.traffic = finished.traffic;
    record
}

/// A request refused before any backend, to be counted with its worker's others.
pub fn refused(finished: Finished<'_>) -> Refused {
    Refused {
        key: bounded(finished.key).to_string(),
        model: bounded(finished.model).to_string(),
        model_served: finished.exact_route,
        status: finished.status,
        count: 1,
        traffic: finished.traffic,
    }
}

/// The tokens a request reserves in its key's token buckets, or OpenAI's
/// 429 for a request that reserves more than a limit holds: it could never be
/// let in, so the SDKs are told not to retry it.
pub fn reservation(
    router: &Router,
    caller: &ClientKey,
    buckets: &[Bucket],
    model: &str,
    tokens: TokenEstimate,
) -> Result<u64, Reply> {
    let Some(smallest) = limits::smallest_token_limit(buckets) else {
        return Ok(0);
    };
    let reserved = tokens.reservation(router.reserved_completion_tokens(), smallest);
    match limits::too_large(buckets, reserved) {
        Some(bucket) => Err(limits::too_large_refusal(&caller.name, model, bucket.per_minute, reserved).into()),
        None => Ok(reserved),
    }
}

/// Counts a routed request reserving `reserved_tokens` against its key's
/// rate limits kept in `store`: what the limits said (for the answer's
/// `x-ratelimit-*` headers) and what the request holds until its answer's
/// usage is known, or the 429 to answer with.
pub fn rate_limit(
    caller: &ClientKey,
    buckets: &[Bucket],
    model: &str,
    reserved_tokens: u64,
    store: &dyn BucketStore,
    now_us: u64,
) -> Result<(Admission, Vec<Reserved>), Reply> {
    let verdicts = limits::admit(store, buckets, reserved_tokens, now_us);
    judge(caller, model, buckets, &verdicts, reserved_tokens, now_us)
}

/// A key's limits' verdicts (one per bucket) on a request reserving
/// `reserved_tokens`, admitted at `at_us`: let through, holding its
/// reservation, or OpenAI's 429.
pub fn judge(
    caller: &ClientKey,
    model: &str,
    buckets: &[Bucket],
    verdicts: &[Verdict],
    reserved_tokens: u64,
    at_us: u64,
) -> Result<(Admission, Vec<Reserved>), Reply> {
    let admission = Admission::from_verdicts(buckets, verdicts);
    match admission.refused() {
        Some((unit, verdict)) => {
            let requested = if unit == Unit::Tokens { reserved_tokens } else { 1 };
            let mut reply = Reply::from(limits::refusal(&caller.name, model, unit, &verdict, requested));
            // A later try succeeds: the SDKs retry a 429 after `retry-after` by themselves.
            reply.headers.push(("retry-after", limits::retry_after_seconds(verdict.retry_after_us).to_string()));
            reply.headers.extend(limits::headers(&admission));
            Err(reply)
        }
        None => Ok((admission, limits::reservations(buckets, verdicts, reserved_tokens, at_us))),
    }
}

/// The shared store's verdicts on `buckets`, one per bucket, from its answer
/// to an admission call; `None` when it did not give them (unreachable,
/// failing, garbled).
pub fn shared_verdicts(buckets: &[Bucket], status: Option<&[u8]>, body: &[u8]) -> Option<Vec<Verdict>> {
    if status != Some(b"200") {
        return None;
    }
    let answer: limits::SpendResponse = serde_json::from_slice(body).ok()?;
    (answer.verdicts.len() == buckets.len()).then_some(answer.verdicts)
}

/// A request whose limits the shared store could not check: let through
/// unlimited, or refused with a 503, as configured.
pub fn without_shared_store(on_failure: FailureMode) -> Result<Admission, Reply> {
    match on_failure {
        FailureMode::Allow => Ok(Admission::default()),
        FailureMode::Deny => Err(GatewayError::rate_limits_unavailable().into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelgate_proto::usage::INVALID;
    use serde_json::Value;

    fn router() -> Router {
        Router::from_json(
            br#"{"max_request_body_bytes": 64,
                "backends": {"a": {"cluster": "cluster_a"}, "b": {"cluster": "cluster_b"}},
                "models": [{"match": "llama-*", "backend": "a"},
                           {"match": "gpt-4o-mini", "backend": "b", "rename": "qwen-7b"}]}"#,
        )
        .unwrap()
    }

    fn json(reply: &Reply) -> Value {
        serde_json::from_slice(&reply.body).unwrap()
    }

    fn head(method: &'static str, path: &'static str) -> RequestHead<'static> {
        RequestHead { method, path, ..Default::default() }
    }

    fn respond(verdict: HeadersVerdict) -> Reply {
        match verdict {
            HeadersVerdict::Respond(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn model_routed_requests_read_their_body_then_route() {
        let r = router();
        assert_eq!(
            on_request_headers(&r, RequestHead { content_length: Some(b"20"), ..head("POST", "/v1/chat/completions") }),
            HeadersVerdict::ReadBody(None, Endpoint::ChatCompletions)
        );
        assert_eq!(
            on_request_body(&r, br#"{"model":"llama-3"}"#, None, Endpoint::ChatCompletions).unwrap(),
            Routing {
                model: "llama-3".into(),
                exact_route: false,
                backend: "a".into(),
                price: None,
                stream: false,
                usage_unasked: false,
                body_edits: Vec::new(),
                cluster: "cluster_a".into(),
                profile: None,
                forwards_client_key: false,
                picked: false,
                stream_cluster: None,
                chain: None,
                tokens: TokenEstimate::default(),
                translated: false,
                stores_response: false,
                answers_translated: false,
            }
        );
        assert_eq!(
            on_request_body(&r, br#"{"model":"gpt-4o-mini","stream":true}"#, None, Endpoint::ChatCompletions).unwrap(),
            Routing {
                model: "gpt-4o-mini".into(),
                exact_route: true,
                backend: "b".into(),
                price: None,
                stream: true,
                usage_unasked: false,
                body_edits: vec![BodyEdit { at: 9, len: 13, with: br#""qwen-7b""#.to_vec() }],
                cluster: "cluster_b".into(),
                profile: None,
                forwards_client_key: false,
                picked: false,
                stream_cluster: None,
                chain: None,
                tokens: TokenEstimate::default(),
                translated: false,
                stores_response: false,
                answers_translated: false,
            }
        );
    }

    #[test]
    fn a_pools_streams_are_picked_by_ext_proc_then_guarded_by_the_stream_guard() {
        let r = Router::from_json(
            br#"{"stream_guard_cluster": "guard",
                "backends": {"p": {"cluster": "vllm_pool", "pool": "vllm-pool"}},
                "models": [{"match": "m", "backend": "p"}]}"#,
        )
        .unwrap();
        let stream = on_request_body(&r, br#"{"model":"m","stream":true}"#, None, Endpoint::ChatCompletions).unwrap();
        assert_eq!((stream.cluster.as_str(), stream.stream_cluster.as_deref()), ("guard", Some("vllm_pool")));
        assert_eq!(stream.profile_header(), headers::BACKEND);
        assert_eq!(stream.profile.as_deref(), Some(r#"{"pool":"vllm-pool"}"#));
    }

    #[test]
    fn ext_proc_is_told_when_the_answer_will_be_whole() {
        let anthropic = r#""backends": {"a": {"cluster": "cluster_a", "dialect": "anthropic"}},
                            "models": [{"match": "m", "backend": "a"}]"#;
        let guarded = Router::from_json(format!(r#"{{"stream_guard_cluster": "guard", {anthropic}}}"#).as_bytes());
        let unguarded = Router::from_json(format!("{{{anthropic}}}").as_bytes());
        let keyed = Router::from_json(
            br#"{"backends": {"a": {"cluster": "cluster_a", "api_key": {"env": "K"}}},
                "models": [{"match": "m", "backend": "a"}]}"#,
        );
        let sent = |router: &Result<Router, _>, body: &[u8]| {
            let routing = on_request_body(router.as_ref().unwrap(), body, None, Endpoint::ChatCompletions).unwrap();
            routing.profile_headers().into_iter().map(|(name, value)| (name, value.to_string())).collect::<Vec<_>>()
        };
        let profile = || r#"{"dialect":"anthropic"}"#.to_string();
        let whole = vec![(headers::BACKEND, profile()), (headers::WHOLE_ANSWER, "1".to_string())];
        assert_eq!(sent(&guarded, br#"{"model":"m"}"#), whole);
        let stream = br#"{"model":"m","stream":true}"#;
        assert_eq!(sent(&guarded, stream), vec![(headers::STREAM_BACKEND, profile())], "ext_proc sees no stream here");
        assert_eq!(sent(&unguarded, stream), vec![(headers::BACKEND, profile())], "a stream through ext_proc");
        let key = r#"{"api_key":{"env":"K"}}"#.to_string();
        assert_eq!(sent(&keyed, br#"{"model":"m"}"#), vec![(headers::BACKEND, key)], "no answer to translate");
    }

    #[test]
    fn streams_go_through_the_stream_guard_when_one_is_configured() {
        let r = Router::from_json(
            br#"{"stream_guard_cluster": "guard",
                "backends": {"a": {"cluster": "cluster_a", "api_key": {"env": "K"}}},
                "models": [{"match": "m", "backend": "a", "rename": "n"}]}"#,
        )
        .unwrap();
        assert_eq!(
            on_request_body(&r, br#"{"model":"m","stream":true}"#, None, Endpoint::ChatCompletions).unwrap(),
            Routing {
                model: "m".into(),
                exact_route: true,
                backend: "a".into(),
                price: None,
                stream: true,
                usage_unasked: false,
                body_edits: Vec::new(),
                cluster: "guard".into(),
                profile: Some(r#"{"model":"n","api_key":{"env":"K"}}"#.into()),
                forwards_client_key: false,
                picked: false,
                stream_cluster: Some("cluster_a".into()),
                chain: None,
                tokens: TokenEstimate::default(),
                translated: false,
                stores_response: false,
                answers_translated: false,
            }
        );
        let guarded = on_request_body(&r, br#"{"model":"m","stream":true}"#, None, Endpoint::ChatCompletions).unwrap();
        assert_eq!(guarded.profile_header(), headers::STREAM_BACKEND, "the guard, not ext_proc, rewrites it");
        let direct = on_request_body(&r, br#"{"model":"m","stream":false}"#, None, Endpoint::ChatCompletions).unwrap();
        assert_eq!(direct.profile_header(), headers::BACKEND);
        assert_eq!(
            on_request_body(&r, br#"{"model":"m","stream":false}"#, None, Endpoint::ChatCompletions).unwrap(),
            Routing {
                model: "m".into(),
                exact_route: true,
                backend: "a".into(),
                price: None,
                stream: false,
                usage_unasked: false,
                body_edits: Vec::new(),
                cluster: "cluster_a".into(),
                profile: Some(r#"{"model":"n","api_key":{"env":"K"}}"#.into()),
                forwards_client_key: false,
                picked: false,
                stream_cluster: None,
                chain: None,
                tokens: TokenEstimate::default(),
                translated: false,
                stores_response: false,
                answers_translated: false,
            }
        );
    }

    /// The body the backend gets, as JSON, for a request `body` routed with accounting on.
    fn sent_upstream(body: &str) -> Value {
        let r = Router::from_json(
            br#"{"accounting": {"cluster": "admin"}, "backends": {"a": {"cluster": "c"}}, "models": [{"match": "*", "backend": "a"}]}"#,
        )
        .unwrap();
        let routing = on_request_body(&r, body.as_bytes(), None, Endpoint::ChatCompletions).unwrap();
        let sent = edited(body.as_bytes(), &routing.body_edits);
        assert_eq!(routing.usage_unasked, !routing.body_edits.is_empty());
        // Changed in place: a strict decoder sees no member twice.
        let text = String::from_utf8(sent.clone()).unwrap();
        assert!(text.matches("stream_options").count() <= 1, "{text}");
        serde_json::from_slice(&sent).unwrap()
    }

    #[test]
    fn a_counted_stream_asks_its_backend_for_usage_keeping_the_clients_options() {
        let sent = sent_upstream("{\"model\":\"m\",\"stream\":true}\n ");
        assert_eq!(sent, serde_json::json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}}));
        let client = r#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1},"n":1}"#;
        let sent = sent_upstream(client);
        assert_eq!(sent["stream_options"], serde_json::json!({"include_usage": true, "x": 1}));
        assert_eq!(sent["n"], 1);
        let asked = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
        assert_eq!(sent_upstream(asked), serde_json::from_str::<Value>(asked).unwrap());
        let whole = r#"{"model":"m","messages":[]}"#;
        assert_eq!(sent_upstream(whole), serde_json::from_str::<Value>(whole).unwrap());
        // Without accounting or token limits nothing is counted, so nothing is asked.
        let routing =
            on_request_body(&router(), br#"{"model":"llama-3","stream":true}"#, None, Endpoint::ChatCompletions)
                .unwrap();
        assert_eq!((routing.usage_unasked, routing.body_edits), (false, Vec::new()));
    }

    /// A router whose model `m` is renamed `n` on an OpenAI backend, with accounting on.
    fn renaming(backend: &str) -> Router {
        let config = format!(
            r#"{{"accounting": {{"cluster": "admin"}}, "backends": {{"a": {backend}}},
                "models": [{{"match": "m", "backend": "a", "rename": "n \"2\""}}]}}"#
        );
        Router::from_json(config.as_bytes()).unwrap()
    }

    #[test]
    fn a_rename_alone_is_made_by_the_filter_without_ext_proc() {
        let r = renaming(r#"{"cluster": "c"}"#);
        let client = r#"{"stream_options":{"x":1},"model" : "m","stream":true,"model_note":"m"}"#;
        let routing = on_request_body(&r, client.as_bytes(), None, Endpoint::ChatCompletions).unwrap();
        assert_eq!((routing.profile.as_deref(), routing.profile_headers()), (None, Vec::new()));
        assert_eq!(
            String::from_utf8(edited(client.as_bytes(), &routing.body_edits)).unwrap(),
            r#"{"stream_options":{"include_usage":true,"x":1},"model" : "n \"2\"","stream":true,"model_note":"m"}"#
        );
        let whole = on_request_body(&r, br#"{"model":"m"}"#, None, Endpoint::ChatCompletions).unwrap();
        assert_eq!(edited(br#"{"model":"m"}"#, &whole.body_edits), br#"{"model":"n \"2\""}"#);
    }

    #[test]
    fn ext_proc_renames_where_it_translates_or_must_collapse_a_repeated_model() {
        let r = renaming(r#"{"cluster": "c"}"#);
        let translated = on_request_body(&r, br#"{"model":"m","input":"hi"}"#, None, Endpoint::Responses).unwrap();
        assert!(translated.translated);
        assert_eq!(translated.profile.as_deref(), Some(r#"{"model":"n \"2\""}"#));
        assert_eq!(translated.body_edits, Vec::new());
        let twice = on_request_body(&r, br#"{"model":"x","model":"m"}"#, None, Endpoint::ChatCompletions).unwrap();
        assert_eq!((twice.profile.as_deref(), twice.body_edits), (Some(r#"{"model":"n \"2\""}"#), Vec::new()));
        let keyed = renaming(r#"{"cluster": "c", "api_key": {"env": "K"}}"#);
        let routing = on_request_body(&keyed, br#"{"model":"m"}"#, None, Endpoint::ChatCompletions).unwrap();
        assert_eq!(routing.profile.as_deref(), Some(r#"{"model":"n \"2\"","api_key":{"env":"K"}}"#));
        assert_eq!(routing.body_edits, Vec::new());
    }

    proptest::proptest! {
        #[test]
        fn a_renamed_body_keeps_every_other_member(
            before in proptest::collection::btree_map("[a-z_]{1,8}", "[ -~]{0,12}", 0..4),
            after in proptest::collection::btree_map("[A-Z]{1,8}", 0u32..100, 0..4),
            stream in proptest::bool::ANY,
        ) {
            let r = renaming(r#"{"cluster": "c"}"#);
            let mut client = serde_json::Map::new();
            for (key, value) in &before {
                client.insert(key.clone(), Value::from(value.as_str()));
            }
            client.insert("model".into(), Value::from("m"));
            client.insert("stream".into(), Value::from(stream));
            for (key, value) in &after {
                client.insert(key.clone(), Value::from(*value));
            }
            let body = serde_json::to_vec(&client).unwrap();
            let routing = on_request_body(&r, &body, None, Endpoint::ChatCompletions).unwrap();
            let sent: serde_json::Map<String, Value> = serde_json::from_slice(&edited(&body, &routing.body_edits)).unwrap();
            let mut expected = client.clone();
            expected.insert("model".into(), Value::from("n \"2\""));
            if stream {
                expected.insert("stream_options".into(), serde_json::json!({"include_usage": true}));
            }
            proptest::prop_assert_eq!(sent, expected);
        }
    }

    #[test]
    fn unknown_model_is_404_model_not_found() {
        let reply =
            on_request_body(&router(), br#"{"model":"claude-3"}"#, None, Endpoint::ChatCompletions).unwrap_err();
        assert_eq!(reply.status, 404);
        assert_eq!(json(&reply)["error"]["code"], "model_not_found");
        assert_eq!(json(&reply)["error"]["param"], "model");
    }

    #[test]
    fn oversized_bodies_are_413_by_header_or_by_count() {
        let r = router();
        let reply = respond(on_request_headers(
            &r,
            RequestHead { content_length: Some(b"65"), ..head("POST", "/v1/embeddings") },
        ));
        assert_eq!(reply.status, 413);
        assert!(json(&reply)["error"]["message"].as_str().unwrap().contains("64 bytes"));
        assert_eq!(
            on_request_headers(&r, RequestHead { content_length: Some(b"64"), ..head("POST", "/v1/embeddings") }),
            HeadersVerdict::ReadBody(None, Endpoint::Embeddings)
        );
        assert_eq!(
            on_request_headers(&r, RequestHead { content_length: Some(b"junk"), ..head("POST", "/v1/embeddings") }),
            HeadersVerdict::ReadBody(None, Endpoint::Embeddings)
        );
        assert!(body_too_large(&r, 64).is_none());
        assert_eq!(body_too_large(&r, 65).unwrap().status, 413);
    }

    #[test]
    fn only_json_bodies_are_read() {
        let r = router();
        let typed = |content_type: &'static [u8]| RequestHead {
            content_type: Some(content_type),
            ..head("POST", "/v1/chat/completions")
        };
        for json in [&b"application/json"[..], b"Application/JSON; charset=utf-8", b" application/json "] {
            assert_eq!(on_request_headers(&r, typed(json)), HeadersVerdict::ReadBody(None, Endpoint::ChatCompletions));
        }
        for other in [&b"text/plain"[..], b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x", b""]
        {
            let reply = respond(on_request_headers(&r, typed(other)));
            assert_eq!(reply.status, 415);
            assert_eq!(json(&reply)["error"]["code"], "unsupported_media_type");
        }
    }

    #[test]
    fn a_bodyless_post_is_400() {
        let reply = respond(on_request_headers(
            &router(),
            RequestHead { end_of_stream: true, ..head("POST", "/v1/chat/completions") },
        ));
        assert_eq!(reply.status, 400);
    }

    #[test]
    fn models_are_answered_from_configuration() {
        let r = router();
        let list = respond(on_request_headers(&r, RequestHead { end_of_stream: true, ..head("GET", "/v1/models") }));
        assert_eq!(list.status, 200);
        assert_eq!(json(&list)["data"][0]["id"], "gpt-4o-mini");
        let one = respond(on_request_headers(
            &r,
            RequestHead { end_of_stream: true, ..head("GET", "/v1/models/llama-3-70b") },
        ));
        assert_eq!(json(&one)["id"], "llama-3-70b");
        let missing =
            respond(on_request_headers(&r, RequestHead { end_of_stream: true, ..head("GET", "/v1/models/nope") }));
        assert_eq!(missing.status, 404);
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        let reply = respond(on_request_headers(
            &router(),
            RequestHead { end_of_stream: true, ..head("GET", "/v1/chat/completions") },
        ));
        assert_eq!(reply.status, 405);
        assert_eq!(reply.headers, vec![("x-should-retry", "false".to_string()), ("allow", "POST".to_string())]);
    }

    #[test]
    fn the_files_and_batch_apis_go_to_the_batch_service_whatever_their_body_once_the_key_is_known() {
        let team = "3fc923743166bae134970eb2789df5145d8b8041e050acf18067986818f41d13";
        let config = |batches: &str| {
            format!(
                r#"{{"max_request_body_bytes": 64, "backends": {{}}, "models": [],
                    "client_keys": [{{"name": "team", "sha256": "{team}"}}]{batches}}}"#
            )
        };
        let served = Router::from_json(config(r#", "batches": {"cluster": "admin"}"#).as_bytes()).unwrap();
        let upload = RequestHead {
            content_type: Some(b"multipart/form-data; boundary=x"),
            content_length: Some(b"209715200"),
            presented: Presented { authorization: Some(b"Bearer sk-team"), api_key: None },
            ..head("POST", "/v1/files")
        };
        let HeadersVerdict::BatchService(Some(caller)) = on_request_headers(&served, upload) else {
            panic!("an upload of any size and type goes to the batch service")
        };
        assert_eq!(caller.name, "team");
        for (method, path) in [("DELETE", "/v1/files/file-1"), ("GET", "/v1/batches/batch_1"), ("PATCH", "/v1/batches")]
        {
            let wrong = RequestHead { end_of_stream: true, ..head(method, path) };
            assert_eq!(respond(on_request_headers(&served, wrong)).status, 401, "{method} {path}");
        }
        let unserved = Router::from_json(config("").as_bytes()).unwrap();
        assert_eq!(on_request_headers(&unserved, upload), HeadersVerdict::PassThrough, "Envoy's routes decide");
    }

    #[test]
    fn a_request_on_behalf_of_a_key_is_that_keys_without_presenting_it() {
        let r = Router::from_json(
            br#"{"backends": {}, "models": [], "batches": {"cluster": "admin"},
                "client_keys": [{"name": "team", "sha256": "3fc923743166bae134970eb2789df5145d8b8041e050acf18067986818f41d13"}]}"#,
        )
        .unwrap();
        let runner =
            |name: &'static [u8]| RequestHead { on_behalf_of: Some(name), ..head("POST", "/v1/chat/completions") };
        let HeadersVerdict::ReadBody(Some(caller), _) = on_request_headers(&r, runner(b"team")) else {
            panic!("the key named is the caller")
        };
        assert_eq!(caller.name, "team");
        let reply = respond(on_request_headers(&r, runner(b"ghost")));
        assert_eq!((reply.status, json(&reply)["error"]["code"].as_str()), (401, Some("invalid_api_key")));
    }

    #[test]
    fn other_paths_pass_through() {
        assert_eq!(
            on_request_headers(&router(), RequestHead { end_of_stream: true, ..head("GET", "/health") }),
            HeadersVerdict::PassThrough
        );
    }

    #[test]
    fn where_keys_are_configured_callers_need_one_and_see_only_their_models() {
        // SHA-256 of "sk-team".
        let r = Router::from_json(
            br#"{"backends": {"a": {"cluster": "cluster_a"}},
                "models": [{"match": "llama-3", "backend": "a"}, {"match": "qwen-2", "backend": "a"}],
                "client_keys": [{"name": "team", "models": ["llama-*"],
                                 "sha256": "3fc923743166bae134970eb2789df5145d8b8041e050acf18067986818f41d13"}]}"#,
        )
        .unwrap();
        let keyed = |path: &'static str, authorization: &'static [u8]| RequestHead {
            end_of_stream: path.starts_with("/v1/models"),
            presented: Presented { authorization: Some(authorization), api_key: None },
            ..head(if path.starts_with("/v1/models") { "GET" } else { "POST" }, path)
        };
        for path in ["/v1/models", "/v1/models/llama-3", "/v1/chat/completions"] {
            let reply = respond(on_request_headers(&r, keyed(path, b"Bearer sk-wrong")));
            assert_eq!(
                (reply.status, json(&reply)["error"]["code"].as_str()),
                (401, Some("invalid_api_key")),
                "{path}"
            );
        }
        let good = b"Bearer sk-team";
        let list = respond(on_request_headers(&r, keyed("/v1/models", good)));
        assert_eq!(json(&list)["data"].as_array().unwrap().len(), 1);
        let HeadersVerdict::ReadBody(caller, _) = on_request_headers(&r, keyed("/v1/chat/completions", good)) else {
            panic!("a known key reads on")
        };
        assert_eq!(caller.as_ref().map(|k| k.name.as_str()), Some("team"));
        assert!(on_request_body(&r, br#"{"model":"llama-3"}"#, caller.as_deref(), Endpoint::ChatCompletions).is_ok());
        let refused =
            on_request_body(&r, br#"{"model":"qwen-2"}"#, caller.as_deref(), Endpoint::ChatCompletions).unwrap_err();
        assert_eq!((refused.status, json(&refused)["error"]["code"].as_str()), (404, Some("model_not_found")));
        // Paths the gateway does not serve are not its to refuse.
        assert_eq!(on_request_headers(&r, keyed("/health", b"")), HeadersVerdict::PassThrough);
    }

    #[test]
    fn only_an_admin_key_may_load_or_unload_adapters_and_an_open_gateway_trusts_everyone() {
        // SHA-256 of "sk-team" and of "sk-free".
        let config = |keys: &str| {
            Router::from_json(
                format!(
                    r#"{{"backends": {{"a": {{"cluster": "c"}}}}, "models": [], "pools": {{"cluster": "admin"}}{keys}}}"#
                )
                .as_bytes(),
            )
            .unwrap()
        };
        let keyed = config(
            r#", "client_keys": [
                {"name": "ops", "admin": true, "sha256": "3fc923743166bae134970eb2789df5145d8b8041e050acf18067986818f41d13"},
                {"name": "free", "sha256": "a97ffab5cd3331858e03076328705ababa22813218d8511eb09bbbce51d39ff8"}]"#,
        );
        let asking = |path: &'static str, authorization: &'static [u8]| RequestHead {
            presented: Presented { authorization: Some(authorization), api_key: None },
            ..head("POST", path)
        };
        for path in ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"] {
            let refused = respond(on_request_headers(&keyed, asking(path, b"Bearer sk-free")));
            assert_eq!(refused.status, 403);
            assert_eq!(json(&refused)["error"]["code"], "admin_key_required");
            assert_eq!(json(&refused)["error"]["type"], "permission_error");
            let HeadersVerdict::PoolOperation(Some(admin)) =
                on_request_headers(&keyed, asking(path, b"Bearer sk-team"))
            else {
                panic!("an admin key goes on")
            };
            assert_eq!(admin.name, "ops");
            assert_eq!(respond(on_request_headers(&keyed, asking(path, b"Bearer sk-nope"))).status, 401);
            assert_eq!(on_request_headers(&config(""), head("POST", path)), HeadersVerdict::PoolOperation(None));
            // Without a pools service, the path is Envoy's routes' as any other.
            assert_eq!(on_request_headers(&router(), head("POST", path)), HeadersVerdict::PassThrough);
        }
    }

    #[test]
    fn tokenize_is_routed_by_model_and_models_wait_for_discovery_where_pools_are_served() {
        let r = router();
        assert_eq!(
            on_request_headers(&r, head("POST", "/tokenize")),
            HeadersVerdict::ReadBody(None, Endpoint::Tokenize)
        );
        assert_eq!(
            on_request_body(&r, br#"{"model":"llama-3","prompt":"hi"}"#, None, Endpoint::ChatCompletions)
                .unwrap()
                .cluster,
            "cluster_a"
        );
        let pooled = Router::from_json(br#"{"backends": {}, "models": [], "pools": {"cluster": "admin"}}"#).unwrap();
        let listing = RequestHead { end_of_stream: true, ..head("GET", "/v1/models/m") };
        assert_eq!(
            on_request_headers(&pooled, listing),
            HeadersVerdict::AskPoolModels(ModelsQuery { caller: None, id: Some("m".into()) })
        );
        assert_eq!(pool_models(Some(b"200"), br#"{"pools": {"p": ["m"]}}"#).unwrap().pools["p"].len(), 1);
        assert_eq!(pool_models(Some(b"503"), br#"{"pools": {}}"#), None);
        assert_eq!(pool_models(Some(b"200"), b"garbled"), None);
        assert_eq!(pool_models(None, b""), None);
    }

    #[test]
    fn a_key_over_its_limit_gets_openais_429_with_retry_after_and_its_headers() {
        let r = Router::from_json(
            br#"{"backends": {"a": {"cluster": "c"}}, "models": [{"match": "*", "backend": "a"}],
                "client_keys": [{"name": "team", "limits": {"requests_per_minute": 2},
                                 "sha256": "3fc923743166bae134970eb2789df5145d8b8041e050acf18067986818f41d13"},
                                {"name": "free", "sha256": "a97ffab5cd3331858e03076328705ababa22813218d8511eb09bbbce51d39ff8"}]}"#,
        )
        .unwrap();
        let presented = Presented { authorization: Some(b"Bearer sk-team"), api_key: None };
        let caller = r.client_keys().authenticate(presented).unwrap().unwrap();
        let store = limits::MemoryBuckets::default();
        let now = 1_000_000_000;
        let buckets = caller.limits.buckets(&caller.name, "m");
        let first = rate_limit(&caller, &buckets, "m", 0, &store, now).unwrap().0.requests.unwrap();
        assert_eq!((first.limit, first.remaining), (2, 1));
        rate_limit(&caller, &buckets, "m", 0, &store, now).unwrap();
        let refused = rate_limit(&caller, &buckets, "m", 0, &store, now + 1_000).unwrap_err();
        assert_eq!(refused.status, 429);
        let error = &json(&refused)["error"];
        assert_eq!((error["type"].as_str(), error["code"].as_str()), (Some("requests"), Some("rate_limit_exceeded")));
        assert!(error["message"].as_str().unwrap().contains("Limit 2, Used 2"), "{error}");
        let header = |name: &str| refused.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
        assert_eq!(header("retry-after"), Some("30"));
        assert_eq!(header("x-ratelimit-remaining-requests"), Some("0"));
        assert_eq!(header("x-ratelimit-reset-requests"), Some("59.999s"));
        assert_eq!(header("x-should-retry"), None, "a 429 may be retried");
        // The same verdicts from a shared store, and what its failure means.
        let refused_again =
            br#"{"verdicts":[{"allowed":false,"limit":2,"remaining":0,"reset_us":60000000,"retry_after_us":30000000}]}"#;
        let verdicts = shared_verdicts(&buckets, Some(b"200"), refused_again).unwrap();
        assert_eq!(judge(&caller, "m", &buckets, &verdicts, 0, now).unwrap_err().status, 429);
        assert_eq!(shared_verdicts(&buckets, Some(b"503"), refused_again), None);
        assert_eq!(shared_verdicts(&buckets, Some(b"200"), br#"{"verdicts":[]}"#), None, "one verdict per bucket");
        assert_eq!(shared_verdicts(&buckets, Some(b"200"), b"<html>"), None);
        assert_eq!(without_shared_store(FailureMode::Allow), Ok(Admission::default()));
        let closed = without_shared_store(FailureMode::Deny).unwrap_err();
        assert_eq!((closed.status, json(&closed)["error"]["code"].as_str()), (503, Some("rate_limits_unavailable")));
        assert_eq!(closed.headers, vec![("x-should-retry", "true".to_string())], "the store may answer the next");

        let free = Presented { authorization: Some(b"Bearer sk-free"), api_key: None };
        let unlimited = r.client_keys().authenticate(free).unwrap().unwrap();
        assert!(unlimited.limits.buckets("free", "m").is_empty());
    }

    #[test]
    fn a_bounded_request_id_is_kept_and_any_other_replaced_by_a_uuid() {
        let kept = "req-3f2b1c7e-0d4a-4e6b-9c1d-2a3b4c5d6e7f";
        assert_eq!(request_id(Some(kept.as_bytes())), (kept.to_string(), false));
        let huge = "x".repeat(60 << 10);
        let mut seen = std::collections::HashSet::new();
        for odd in [None, Some(&b""[..]), Some(huge.as_bytes()), Some(b"a b"), Some(b"\xff\xfe"), Some(b"a\"}")] {
            let (id, replaced) = request_id(odd);
            assert!(replaced, "{odd:?}");
            let hex: String = id.chars().filter(|c| *c != '-').collect();
            assert_eq!((id.len(), hex.len(), id.matches('-').count()), (36, 32, 4), "{id}");
            assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
            assert_eq!((&id[14..15], id[19..20].chars().all(|c| "89ab".contains(c))), ("4", true), "{id}");
            assert!(seen.insert(id), "a new id each time");
        }
    }

    #[test]
    fn records_bound_what_clients_chose_and_name_models_only_when_vouched_for() {
        let answered = Finished {
            request_id: "r1",
            key: "team",
            model: "qwen-3",
            exact_route: false,
            backend: "pool",
            price: None,
            status: 200,
            traffic: Traffic::Batch,
        };
        let record = usage_record(UsageRecord::default(), answered);
        assert_eq!(record.traffic, Traffic::Batch);
        assert_eq!(
            (record.request_id.as_str(), record.key.as_str(), record.model.as_str(), record.backend.as_str()),
            ("r1", "team", "qwen-3", "pool")
        );
        assert!(record.model_served, "a backend answered it");
        for status in [0, 404, 500] {
            assert!(!usage_record(UsageRecord::default(), Finished { status, ..answered }).model_served, "{status}");
        }
        assert!(
            usage_record(UsageRecord::default(), Finished { status: 503, exact_route: true, ..answered }).model_served
        );
        let long = "q".repeat(1 << 20);
        let odd = Finished { model: &long, key: "a key", backend: "b\n", request_id: "\"", ..answered };
        let record = usage_record(UsageRecord::default(), odd);
        assert_eq!([record.request_id, record.key, record.model, record.backend], [INVALID; 4]);
        assert_eq!(
            refused(Finished { status: 429, ..odd }),
            Refused {
                key: INVALID.into(),
                model: INVALID.into(),
                status: 429,
                count: 1,
                traffic: Traffic::Batch,
                ..Refused::default()
            }
        );
        // Only configuration vouches for a refused request's model.
        let r = router();
        assert!(
            on_request_body(&r, br#"{"model":"gpt-4o-mini"}"#, None, Endpoint::ChatCompletions).unwrap().exact_route
        );
        assert!(!on_request_body(&r, br#"{"model":"llama-3"}"#, None, Endpoint::ChatCompletions).unwrap().exact_route);
    }

    #[test]
    fn a_token_limited_key_reserves_its_requests_tokens_and_refuses_one_that_can_never_fit() {
        let r = Router::from_json(
            br#"{"backends": {"a": {"cluster": "c"}}, "models": [{"match": "*", "backend": "a"}],
                "reserved_completion_tokens": 100,
                "client_keys": [{"name": "team", "limits": {"tokens_per_minute": 60},
                                 "sha256": "3fc923743166bae134970eb2789df5145d8b8041e050acf18067986818f41d13"}]}"#,
        )
        .unwrap();
        let presented = Presented { authorization: Some(b"Bearer sk-team"), api_key: None };
        let caller = r.client_keys().authenticate(presented).unwrap().unwrap();
        let buckets = caller.limits.buckets(&caller.name, "m");
        let routed =
            |body: &str| on_request_body(&r, body.as_bytes(), Some(&caller), Endpoint::ChatCompletions).unwrap().tokens;
        let hello = r#"{"model":"m","messages":[{"role":"user","content":"hello"}]"#;
        let bounded = routed(&format!("{hello},\"max_tokens\":5}}"));
        assert_eq!(reservation(&r, &caller, &buckets, "m", bounded), Ok(14));
        // Without a bound, the configured length, but never more than the whole limit.
        assert_eq!(reservation(&r, &caller, &buckets, "m", routed(&format!("{hello}}}"))), Ok(60));
        let too_large = reservation(&r, &caller, &buckets, "m", routed(&format!("{hello},\"max_tokens\":52}}")));
        let reply = too_large.unwrap_err();
        assert_eq!((reply.status, json(&reply)["error"]["type"].as_str()), (429, Some("tokens")));
        assert!(json(&reply)["error"]["message"].as_str().unwrap().contains("Limit 60, Requested 61."));
        assert_eq!(reply.headers, vec![("x-should-retry", "false".to_string())], "waiting would not help");

        let store = limits::MemoryBuckets::default();
        let now = 1_000_000_000;
        let (admission, held) = rate_limit(&caller, &buckets, "m", 14, &store, now).unwrap();
        assert_eq!(admission.tokens.map(|v| v.remaining), Some(46));
        assert_eq!(held.iter().map(|h| h.tokens).collect::<Vec<_>>(), [14]);
        for _ in 0..3 {
            rate_limit(&caller, &buckets, "m", 14, &store, now).unwrap();
        }
        let refused = rate_limit(&caller, &buckets, "m", 14, &store, now).unwrap_err();
        let message = json(&refused)["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("Limit 60, Used 56, Requested 14."), "{message}");
        // Keys without token limits reserve nothing.
        assert_eq!(reservation(&r, &caller, &buckets[..0], "m", bounded), Ok(0));
        // Nor does counting a prompt's tokens, however long the prompt.
        let count = format!("{hello},\"max_tokens\":52}}");
        let counted = on_request_body(&r, count.as_bytes(), Some(&caller), Endpoint::CountTokens).unwrap().tokens;
        assert_eq!(reservation(&r, &caller, &buckets, "m", counted), Ok(0));
    }
}
