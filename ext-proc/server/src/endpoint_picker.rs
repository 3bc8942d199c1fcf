//! The Gateway API Inference Extension's endpoint-picker protocol: ext_proc in
//! `FULL_DUPLEX_STREAMED` mode, as Envoy Gateway, Istio or kgateway call it
//! for an HTTPRoute to an InferencePool. One [`EndpointPicker`] answers the
//! messages of one request: it holds the answer to the request headers until
//! the body is whole (the prompt decides the pick), names the replicas in the
//! destination header and in the `envoy.lb` metadata, sends the body back
//! unchanged, and counts the request on the replica that served it until the
//! answer ends. Pure; tested without Envoy.

use crate::envoy_messages::{self, LB_NAMESPACE};
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, ProcessingRequest, ProcessingResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use modelgate_pools::pool::{PickRequest, Picked, Pool};
use modelgate_pools::request::pick_fields;
use modelgate_proto::client_api::ClientApi;
use std::sync::Arc;
use std::time::Instant;

/// Where the data plane may restrict the pick to some endpoints.
const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
const SERVED_KEY: &str = "x-gateway-destination-endpoint-served";

/// The most of a request body held back for the pick. A longer body is picked
/// for on its first bytes (without its model or prompt, which a cut JSON
/// document does not give), and the rest streams through as it comes, so a
/// request of any size costs this process a bounded amount of memory.
pub const MAX_HELD_BODY_BYTES: usize = 4 << 20;

pub struct EndpointPicker {
    pool: Arc<Pool>,
    phase: Phase,
    /// The data plane's subset hint, from the first message that carries it.
    subset: Option<Vec<String>>,
    /// The value of the pool's session header, if the request sent it.
    session: Option<Vec<u8>>,
}

enum Phase {
    /// Before the request headers.
    Start,
    /// The request body so far, in the pieces Envoy sent, until the pick.
    Holding { pieces: Vec<Vec<u8>>, bytes: usize },
    /// Counted on a replica until the answer ends.
    Picked(Picked),
    /// Refused, or the answer ended: messages are only passed on.
    Done,
}

impl EndpointPicker {
    pub fn new(pool: Arc<Pool>) -> Self {
        EndpointPicker { pool, phase: Phase::Start, subset: None, session: None }
    }

    /// The answers to one message, in order: none while the request's body is
    /// held, the header answer and the held body at the pick.
    pub fn on_message(&mut self, message: ProcessingRequest, now: Instant) -> Vec<ProcessingResponse> {
        let metadata = message.metadata_context.unwrap_or_default();
        if self.subset.is_none() {
            self.subset = subset_hint(&metadata);
        }
        let Some(request) = message.request else { return Vec::new() };
        match request {
            Request::RequestHeaders(headers) => {
                self.session = self
                    .pool
                    .config()
                    .session_header
                    .as_deref()
                    .and_then(|name| envoy_messages::header(&headers, name).map(<[u8]>::to_vec));
                // Without FULL_DUPLEX_STREAMED (a misconfigured filter) no body
                // would come before the headers are answered: pick now.
                let streamed = message
                    .protocol_config
                    .is_none_or(|config| config.request_body_mode == BodySendMode::FullDuplexStreamed as i32);
                if headers.end_of_stream || !streamed {
                    return vec![self.pick(&[], now)];
                }
                self.phase = Phase::Holding { pieces: Vec::new(), bytes: 0 };
                Vec::new()
            }
            Request::RequestBody(body) => {
                let Phase::Holding { pieces, bytes } = &mut self.phase else {
                    return vec![envoy_messages::stream_body_piece(true, body.body, body.end_of_stream)];
                };
                *bytes += body.body.len();
                pieces.push(body.body);
                if body.end_of_stream || *bytes > MAX_HELD_BODY_BYTES {
                    self.release(body.end_of_stream, now)
                } else {
                    Vec::new()
                }
            }
            Request::RequestTrailers(_) => {
                let mut answers =
                    if matches!(self.phase, Phase::Holding { .. }) { self.release(false, now) } else { Vec::new() };
                answers.push(envoy_messages::pass(&request));
                answers
            }
            Request::ResponseHeaders(ref headers) => {
                self.note_served(&metadata);
                if headers.end_of_stream {
                    self.phase = Phase::Done;
                }
                vec![envoy_messages::pass(&request)]
            }
            Request::ResponseBody(body) => {
                self.note_served(&metadata);
                if body.end_of_stream {
                    self.phase = Phase::Done;
                }
                vec![envoy_messages::stream_body_piece(false, body.body, body.end_of_stream)]
            }
            Request::ResponseTrailers(_) => {
                self.phase = Phase::Done;
                vec![envoy_messages::pass(&request)]
            }
        }
    }

    /// Picks on the held body, then sends it on: the header answer first, the
    /// pieces after it (the last one ending the body if `whole`). A refusal
    /// is the only answer.
    fn release(&mut self, whole: bool, now: Instant) -> Vec<ProcessingResponse> {
        let Phase::Holding { pieces, .. } = std::mem::replace(&mut self.phase, Phase::Done) else {
            return Vec::new();
        };
        let body = pieces.concat();
        let headers = self.pick(&body, now);
        if !matches!(self.phase, Phase::Picked(_)) {
            return vec![headers];
        }
        let last = pieces.len().saturating_sub(1);
        let pieces = pieces
            .into_iter()
            .enumerate()
            .map(|(i, piece)| envoy_messages::stream_body_piece(true, piece, whole && i == last));
        std::iter::once(headers).chain(pieces).collect()
    }

    /// The answer to the request headers: the destination, or a refusal.
    fn pick(&mut self, body: &[u8], now: Instant) -> ProcessingResponse {
        // A body that is not an OpenAI request (or was cut) is picked for
        // without a model or prompt: the replica judges it, not the picker.
        let fields = pick_fields(body).ok();
        let model = fields.as_ref().map_or("", |f| f.model.as_str());
        let request = PickRequest {
            model,
            prompt: fields.as_ref().map_or(&[], |f| f.prompt),
            session: self.session.as_deref(),
            subset: self.subset.as_deref(),
        };
        match self.pool.pick(&request, now) {
            Ok(picked) => {
                let destination = picked.destination();
                self.phase = Phase::Picked(picked);
                envoy_messages::pick_destination(&destination)
            }
            Err(refusal) => {
                self.phase = Phase::Done;
                envoy_messages::reject_with(
                    &refusal.to_error(self.pool.name(), model),
                    ClientApi::Openai,
                    refusal.retry_after_secs(),
                )
            }
        }
    }

    /// After retries the data plane says which endpoint served: the request
    /// is counted there.
    fn note_served(&mut self, metadata: &Metadata) {
        if let (Phase::Picked(picked), Some(served)) = (&mut self.phase, served_endpoint(metadata)) {
            picked.served(served);
        }
    }
}

/// The endpoints the data plane allows, when it says: a list of `ip:port`
/// (a single comma-separated string is read as well).
fn subset_hint(metadata: &Metadata) -> Option<Vec<String>> {
    let hint = metadata.filter_metadata.get(SUBSET_NAMESPACE)?.fields.get(SUBSET_KEY)?;
    Some(match hint.kind.as_ref()? {
        Kind::ListValue(list) => list
            .values
            .iter()
            .filter_map(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.trim().to_string()),
                _ => None,
            })
            .collect(),
        Kind::StringValue(s) => s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect(),
        _ => Vec::new(),
    })
}

fn served_endpoint(metadata: &Metadata) -> Option<&str> {
    match metadata.filter_metadata.get(LB_NAMESPACE)?.fields.get(SERVED_KEY)?.kind.as_ref()? {
        Kind::StringValue(served) => Some(served),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        body_mutation::Mutation, processing_response::Response, CommonResponse, HttpBody, HttpHeaders,
        ImmediateResponse, StreamedBodyResponse,
    };
    use envoy_types::pb::google::protobuf::ListValue;
    use envoy_types::pb::google::protobuf::{Struct, Value};
    use modelgate_pools::metrics::ReplicaMetrics;
    use modelgate_pools::Pools;
    use modelgate_proto::headers::DESTINATION_ENDPOINT;
    use proptest::prelude::*;
    use serde_json::Value as Json;
    use std::collections::HashMap;

    const REPLICAS: [&str; 4] = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000"];

    /// A pool of four replicas, each freshly scraped with `waiting` requests queued.
    fn pool(extra: &str, waiting: u64) -> Arc<Pool> {
        let json = format!(
            r#"{{"pools": {{"p": {{"replicas": {}, "session_header": "x-session-id" {extra}}}}}}}"#,
            serde_json::to_string(&REPLICAS).unwrap()
        );
        let pool = Arc::clone(Pools::from_json(json.as_bytes()).unwrap().get("p").unwrap());
        for replica in pool.replicas().iter() {
            replica.update(|state| {
                state.metrics = Some(ReplicaMetrics { waiting, ..Default::default() });
                state.scraped_at = Some(Instant::now());
            });
        }
        pool
    }

    fn headers(end_of_stream: bool) -> ProcessingRequest {
        let headers = [(":path", "/v1/chat/completions"), ("x-gateway-destination-endpoint", "6.6.6.6:1")]
            .iter()
            .map(|(k, v)| HeaderValue { key: k.to_string(), raw_value: v.as_bytes().to_vec(), ..Default::default() })
            .collect();
        let headers = HttpHeaders { headers: Some(HeaderMap { headers }), end_of_stream, ..Default::default() };
        ProcessingRequest { request: Some(Request::RequestHeaders(headers)), ..Default::default() }
    }

    fn with_metadata(mut message: ProcessingRequest, namespace: &str, key: &str, value: Kind) -> ProcessingRequest {
        let fields = HashMap::from([(key.to_string(), Value { kind: Some(value) })]);
        message.metadata_context = Some(Metadata {
            filter_metadata: HashMap::from([(namespace.to_string(), Struct { fields })]),
            ..Default::default()
        });
        message
    }

    fn subset(message: ProcessingRequest, endpoints: &[&str]) -> ProcessingRequest {
        let values = endpoints.iter().map(|e| Value { kind: Some(Kind::StringValue(e.to_string())) }).collect();
        with_metadata(message, SUBSET_NAMESPACE, SUBSET_KEY, Kind::ListValue(ListValue { values }))
    }

    fn body(bytes: &[u8], end_of_stream: bool, response: bool) -> ProcessingRequest {
        let body = HttpBody { body: bytes.to_vec(), end_of_stream, ..Default::default() };
        let request = if response { Request::ResponseBody(body) } else { Request::RequestBody(body) };
        ProcessingRequest { request: Some(request), ..Default::default() }
    }

    fn chat(content: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": content}]}))
            .unwrap()
    }

    /// The request's whole exchange up to the pick: headers, then its body in one piece.
    fn send(picker: &mut EndpointPicker, headers: ProcessingRequest, request_body: &[u8]) -> Vec<ProcessingResponse> {
        assert!(picker.on_message(headers, Instant::now()).is_empty(), "the headers' answer waits for the body");
        picker.on_message(body(request_body, true, false), Instant::now())
    }

    /// The destination header's value and the `envoy.lb` metadata's, from the answer to the headers.
    fn destination(answer: &ProcessingResponse) -> (String, String) {
        let Some(Response::RequestHeaders(h)) = &answer.response else { panic!("not a headers answer: {answer:?}") };
        let set = &h.response.as_ref().unwrap().header_mutation.as_ref().unwrap().set_headers[0];
        let header = set.header.as_ref().unwrap();
        assert_eq!(header.key, DESTINATION_ENDPOINT);
        assert_eq!(set.append_action, 2, "the client's copy is overwritten, not appended to");
        let metadata = &answer.dynamic_metadata.as_ref().unwrap().fields[LB_NAMESPACE];
        let Some(Kind::StructValue(lb)) = &metadata.kind else { panic!("envoy.lb is not a struct") };
        let Some(Kind::StringValue(value)) = &lb.fields[DESTINATION_ENDPOINT].kind else { panic!("not a string") };
        (String::from_utf8(header.raw_value.clone()).unwrap(), value.clone())
    }

    fn streamed(answer: &ProcessingResponse) -> StreamedBodyResponse {
        let (Some(Response::RequestBody(b)) | Some(Response::ResponseBody(b))) = &answer.response else {
            panic!("not a body answer: {answer:?}")
        };
        let CommonResponse { body_mutation: Some(mutation), .. } = b.response.clone().unwrap() else {
            panic!("no body mutation")
        };
        let Some(Mutation::StreamedResponse(piece)) = mutation.mutation else { panic!("not streamed") };
        piece
    }

    fn refusal(answer: &ProcessingResponse) -> (u32, Vec<(String, String)>, Json) {
        let Some(Response::ImmediateResponse(ImmediateResponse { status, headers, body, .. })) = &answer.response
        else {
            panic!("not a refusal: {answer:?}")
        };
        let headers = headers.as_ref().unwrap().set_headers.iter().map(|h| {
            let h = h.header.as_ref().unwrap();
            (h.key.clone(), String::from_utf8(h.raw_value.clone()).unwrap())
        });
        (status.as_ref().unwrap().code as u32, headers.collect(), serde_json::from_slice(body).unwrap())
    }

    #[test]
    fn header_and_metadata_name_the_same_replicas_and_the_body_goes_back_unchanged() {
        let mut picker = EndpointPicker::new(pool("", 0));
        let request = chat("hello");
        let answers = send(&mut picker, headers(false), &request);
        assert_eq!(answers.len(), 2);
        let (header, metadata) = destination(&answers[0]);
        assert_eq!(header, metadata);
        for endpoint in header.split(',') {
            assert!(REPLICAS.contains(&endpoint), "{endpoint} is not a replica");
        }
        assert_eq!(
            streamed(&answers[1]),
            StreamedBodyResponse { body: request, end_of_stream: true, ..Default::default() }
        );
    }

    #[test]
    fn a_request_without_a_body_is_picked_at_its_headers() {
        // Even where every replica's model list is known: the request names no model.
        let pool = pool(r#", "discover_models": true"#, 0);
        for replica in pool.replicas().iter() {
            replica.update(|state| state.models = Some(["m".to_string()].into()));
        }
        let mut picker = EndpointPicker::new(pool);
        let answers = picker.on_message(headers(true), Instant::now());
        assert_eq!(answers.len(), 1);
        let (header, metadata) = destination(&answers[0]);
        assert_eq!(header, metadata);
    }

    #[test]
    fn the_subset_hint_restricts_the_pick() {
        for allowed in [&REPLICAS[2..3], &REPLICAS[1..3]] {
            let mut picker = EndpointPicker::new(pool("", 0));
            let answers = send(&mut picker, subset(headers(false), allowed), &chat("hi"));
            let (header, _) = destination(&answers[0]);
            assert!(header.split(',').all(|e| allowed.contains(&e)), "{header} is outside {allowed:?}");
        }
    }

    #[test]
    fn a_dns_pools_current_replicas_are_picked_and_the_subset_hint_narrows_them() {
        let pool = Arc::clone(Pools::from_json(br#"{"pools":{"p":{"dns":"vllm:8000"}}}"#).unwrap().get("p").unwrap());
        let scraped = |pool: &Pool| {
            for replica in pool.replicas().iter() {
                replica.update(|state| {
                    state.metrics = Some(ReplicaMetrics::default());
                    state.scraped_at = Some(Instant::now());
                });
            }
        };
        pool.set_replicas(REPLICAS[..2].iter().map(|a| a.to_string()));
        scraped(&pool);
        let mut picker = EndpointPicker::new(Arc::clone(&pool));
        let (header, _) = destination(&send(&mut picker, subset(headers(false), &REPLICAS[1..3]), &chat("hi"))[0]);
        assert_eq!(header, REPLICAS[1], "the third is not a replica yet");

        pool.set_replicas(REPLICAS[2..].iter().map(|a| a.to_string()));
        scraped(&pool);
        let mut picker = EndpointPicker::new(Arc::clone(&pool));
        let (header, _) = destination(&send(&mut picker, subset(headers(false), &REPLICAS[1..3]), &chat("hi"))[0]);
        assert_eq!(header, REPLICAS[2], "the second left; the third joined");
    }

    #[test]
    fn an_empty_or_unknown_subset_is_a_503() {
        for allowed in [&[][..], &["192.168.9.9:1"][..]] {
            let mut picker = EndpointPicker::new(pool("", 0));
            let answers = send(&mut picker, subset(headers(false), allowed), &chat("hi"));
            assert_eq!(answers.len(), 1, "a refusal is the only answer");
            let (status, _, error) = refusal(&answers[0]);
            assert_eq!(status, 503);
            assert_eq!(error["error"]["code"], "no_ready_replica");
        }
    }

    #[test]
    fn nothing_ready_is_a_503() {
        let pool = pool("", 0);
        for replica in pool.replicas().iter() {
            replica.update(|state| *state = Default::default());
        }
        let mut picker = EndpointPicker::new(pool);
        let (status, headers, error) = refusal(&picker.on_message(headers(true), Instant::now())[0]);
        assert_eq!(status, 503);
        assert!(headers.contains(&("content-type".into(), "application/json".into())));
        assert_eq!(error["error"]["code"], "no_ready_replica");
    }

    #[test]
    fn a_saturated_pool_sheds_with_a_429_and_retry_after() {
        let mut picker = EndpointPicker::new(pool(r#", "max_waiting": 5, "retry_after_secs": 3"#, 9));
        let answers = send(&mut picker, headers(false), &chat("hi"));
        let (status, headers, error) = refusal(&answers[0]);
        assert_eq!(status, 429);
        assert!(headers.contains(&("retry-after".into(), "3".into())));
        assert_eq!(error["error"]["code"], "pool_saturated");
    }

    fn in_flight(pool: &Pool) -> Vec<u64> {
        pool.replicas().iter().map(|r| r.in_flight()).collect()
    }

    #[test]
    fn the_served_endpoint_is_counted_until_the_answer_ends() {
        let pool = pool("", 0);
        let mut picker = EndpointPicker::new(Arc::clone(&pool));
        let (header, _) = destination(&send(&mut picker, headers(false), &chat("hi"))[0]);
        let endpoints: Vec<&str> = header.split(',').collect();
        assert!(endpoints.len() > 1, "fallbacks follow the first choice: {header}");
        let index = |address: &str| REPLICAS.iter().position(|r| *r == address).unwrap();
        assert_eq!(in_flight(&pool)[index(endpoints[0])], 1);

        // A retry went to the second.
        let response =
            ProcessingRequest { request: Some(Request::ResponseHeaders(HttpHeaders::default())), ..Default::default() };
        let response = with_metadata(response, LB_NAMESPACE, SERVED_KEY, Kind::StringValue(endpoints[1].into()));
        picker.on_message(response, Instant::now());
        let counts = in_flight(&pool);
        assert_eq!((counts[index(endpoints[0])], counts[index(endpoints[1])]), (0, 1));

        let answer = picker.on_message(body(b"data: [DONE]\n\n", true, true), Instant::now());
        assert_eq!(
            streamed(&answer[0]),
            StreamedBodyResponse { body: b"data: [DONE]\n\n".to_vec(), end_of_stream: true, ..Default::default() }
        );
        assert_eq!(in_flight(&pool), vec![0; 4]);
    }

    #[test]
    fn a_body_past_the_held_limit_is_picked_for_early_and_streams_on() {
        let mut picker = EndpointPicker::new(pool("", 0));
        assert!(picker.on_message(headers(false), Instant::now()).is_empty());
        let piece = vec![b'x'; 1 << 20];
        let mut answers = Vec::new();
        for _ in 0..(MAX_HELD_BODY_BYTES >> 20) {
            answers.extend(picker.on_message(body(&piece, false, false), Instant::now()));
        }
        assert!(answers.is_empty(), "held up to the limit");
        answers.extend(picker.on_message(body(&piece, false, false), Instant::now()));
        destination(&answers[0]);
        assert_eq!(answers.len(), 1 + (MAX_HELD_BODY_BYTES >> 20) + 1);
        let last = picker.on_message(body(b"end", true, false), Instant::now());
        assert_eq!(
            streamed(&last[0]),
            StreamedBodyResponse { body: b"end".to_vec(), end_of_stream: true, ..Default::default() }
        );
    }

    proptest! {
        #[test]
        fn bodies_stream_through_unchanged_in_any_pieces(
            request in proptest::collection::vec(any::<u8>(), 0..4096),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut picker = EndpointPicker::new(pool("", 0));
            prop_assert!(picker.on_message(headers(false), Instant::now()).is_empty());
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(request.len() + 1)).collect();
            cuts.extend([0, request.len()]);
            cuts.sort_unstable();
            let mut answers = Vec::new();
            for (i, window) in cuts.windows(2).enumerate() {
                let last = i == cuts.len() - 2;
                answers.extend(picker.on_message(body(&request[window[0]..window[1]], last, false), Instant::now()));
            }
            destination(&answers[0]);
            let pieces: Vec<StreamedBodyResponse> = answers[1..].iter().map(streamed).collect();
            prop_assert_eq!(pieces.iter().flat_map(|p| p.body.clone()).collect::<Vec<u8>>(), request);
            prop_assert!(pieces.last().unwrap().end_of_stream);
            prop_assert!(pieces[..pieces.len() - 1].iter().all(|p| !p.end_of_stream));
        }
    }
}
