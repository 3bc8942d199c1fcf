//! Names of the headers modelgate uses between its own parts.
//!
//! The filter removes every header in [`INTERNAL`] from the client's request
//! before routing, so only configuration decides where a request goes.

/// Set by the filter: the Envoy cluster chosen for the request's model.
/// Routes use it as their `cluster_header`.
pub const CLUSTER: &str = "x-modelgate-cluster";

/// Set by the filter when the backend needs its requests rewritten (another
/// dialect, another model name, an API key, defaults): the backend's profile
/// as JSON ([`crate::backend::BackendProfile`]). Its presence is what engages
/// ext_proc (a matcher on it creates the ext_proc filter): a request in a
/// client API its backend does not serve carries it always, `{}` where ext_proc
/// only translates that API.
pub const BACKEND: &str = "x-modelgate-backend";

/// Set by the filter, beside [`BACKEND`], on a request that asked for one
/// answer, not a stream: ext_proc then takes a translated answer in one
/// message, its body with its status, instead of its headers and then its
/// body. ext_proc removes it before the request goes on.
pub const WHOLE_ANSWER: &str = "x-modelgate-whole-answer";

/// Set by the filter on a streaming request it sends through the stream guard:
/// the backend's cluster, which the guard passes on as [`CLUSTER`].
pub const STREAM_CLUSTER: &str = "x-modelgate-stream-cluster";

/// Set by the filter instead of [`BACKEND`] on a stream it sends through the
/// stream guard: the same profile, for the guard to rewrite the request and
/// translate the answer itself. ext_proc is not engaged for such a stream.
pub const STREAM_BACKEND: &str = "x-modelgate-stream-backend";

/// Set by the filter on a request for a model with fallbacks, sent to the
/// stream guard whole or streamed: the backends to try in turn, with their
/// clusters and profiles ([`crate::chain::Chain`]).
pub const CHAIN: &str = "x-modelgate-chain";

/// Response headers naming the backend that answered and how many attempts
/// it took: set by the stream guard for a model with fallbacks, and by
/// Envoy's routes (endpoint metadata, attempt count) for the rest.
pub const SERVED_BY: &str = "modelgate-backend";
pub const ATTEMPTS: &str = "modelgate-attempts";

/// The headers a client's API key can come in. Unless its backend is set to
/// `passthrough`, the filter removes them before the request goes upstream.
pub const CLIENT_KEYS: &[&str] = &["authorization", "api-key", "x-api-key"];

/// Set by the filter, from its `internal_token` setting, on what it sends to
/// the stream guard and to ext-proc's admin port (and by Envoy, as gRPC
/// metadata, on ext_proc's streams): proves the caller is the gateway's Envoy.
pub const INTERNAL_TOKEN: &str = "x-modelgate-internal-token";

/// Set by the filter on a request to the Files or Batch API, or the stored
/// responses, for ext-proc's batch service, and on a Responses request
/// ext_proc translates: the name of the client key that made it (empty on an
/// open gateway), which owns the files, batches and responses it creates.
/// Trusted only with [`INTERNAL_TOKEN`].
pub const OWNER: &str = "x-modelgate-owner";

/// Sent by ext-proc's batch runner with [`INTERNAL_TOKEN`] on each line it
/// sends through Envoy's listener: the name of the key the batch belongs to.
/// The filter takes such a request as that key's, and as batch traffic.
pub const ON_BEHALF_OF: &str = "x-modelgate-on-behalf-of";

/// Set by ext-proc's endpoint picker on a request for a self-hosted pool: the
/// replicas to try, best first, as `ip:port,ip:port` (the Gateway API
/// Inference Extension's endpoint-picker protocol). The pool's cluster picks
/// its host from it (Envoy's override-host load balancing, which goes down the
/// list on retries). A client's copy would bypass the picker: it is dropped.
pub const DESTINATION_ENDPOINT: &str = "x-gateway-destination-endpoint";

/// Set by the filter on a stream it sends through the stream guard and counts
/// the tokens of: `read` where the client asked for the stream's usage,
/// `unasked` where only the gateway did (the guard then removes it from the
/// stream). Reached over HTTP/2, the guard reads the usage in the events it
/// relays, announces the trailer [`USAGE_TRAILER`] in the answer's `trailer`
/// header, and sends it at the stream's end, so the filter need not read the
/// stream itself. Over HTTP/1.1 it does neither: the filter reads the stream.
pub const USAGE: &str = "x-modelgate-usage";

/// The stream guard's trailer on a stream asked for with [`USAGE`], as
/// [`crate::usage_trailer::UsageTrailer`] writes it. The filter removes it,
/// and the `trailer` header announcing it: clients never see either.
pub const USAGE_TRAILER: &str = "modelgate-usage";

/// Every internal request header; a client's copy of any of them is dropped.
pub const INTERNAL: &[&str] = &[
    CLUSTER,
    BACKEND,
    WHOLE_ANSWER,
    STREAM_CLUSTER,
    STREAM_BACKEND,
    CHAIN,
    INTERNAL_TOKEN,
    OWNER,
    ON_BEHALF_OF,
    DESTINATION_ENDPOINT,
    USAGE,
];

/// A response header Envoy's inner listener (behind the stream guard) adds with
/// its `%RESPONSE_CODE_DETAILS%`, so the filter can tell its local replies
/// (no healthy upstream, timeout) from a backend's answer.
pub const CODE_DETAILS: &str = "x-modelgate-code-details";

/// Set by the filter on each batch of usage records it sends to ext-proc's
/// admin port: the batch's id, unique across Envoy workers and restarts and
/// kept when the batch is sent again, so ext-proc applies it once.
pub const BATCH_ID: &str = "x-modelgate-batch-id";
