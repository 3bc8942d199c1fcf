//! The tonic side of ext_proc: each gRPC stream's messages are answered in
//! order by one [`Exchange`], as a stream transformation — no task or channel
//! per request on this hot path.

use crate::exchange::Exchange;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use modelgate_dialects::credentials::KeySources;
use modelgate_pools::Pools;
use modelgate_proto::headers;
use modelgate_runtime::internal_token::InternalToken;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

/// The default of `--max-message-bytes`: the largest message of an exchange,
/// either way. A message carries a whole request body (the filter refuses
/// those over its `max_request_body_bytes`, 4 MiB by default) or a whole
/// answer to translate (Envoy buffers at most its listener's
/// `per_connection_buffer_limit_bytes`, 16 MiB in the demo), and a translated
/// answer can be somewhat longer than the backend's: twice the larger.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 32 << 20;

#[derive(Debug)]
pub struct Processor {
    /// The key sources this process may read, from its command line.
    pub keys: Arc<KeySources>,
    /// The longest event of a stream it translates.
    pub max_event_bytes: usize,
    /// The self-hosted pools whose replicas it picks.
    pub pools: Arc<Pools>,
}

/// The gRPC service: callers must present `token`, and messages either way are
/// of up to `max_message_bytes`.
pub fn server(
    processor: Processor,
    token: InternalToken,
    max_message_bytes: usize,
) -> InterceptedService<ExternalProcessorServer<Processor>, TokenCheck> {
    let server = ExternalProcessorServer::new(processor)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    InterceptedService::new(server, TokenCheck(token))
}

/// ext_proc's gRPC stream carries the internal token as metadata (Envoy's `initial_metadata`).
#[derive(Clone)]
pub struct TokenCheck(InternalToken);

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match self.0.check(request.metadata().get(headers::INTERNAL_TOKEN).map(|v| v.as_bytes())) {
            Ok(()) => Ok(request),
            Err(refused) => Err(Status::unauthenticated(refused.message)),
        }
    }
}

type Answers = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Processor {
    type ProcessStream = Answers;

    async fn process(&self, request: Request<Streaming<ProcessingRequest>>) -> Result<Response<Answers>, Status> {
        let mut exchange = Exchange::new(Arc::clone(&self.keys), Arc::clone(&self.pools), self.max_event_bytes);
        let mut failed = false;
        let answers = request.into_inner().map_while(move |message| match message {
            _ if failed => None,
            Ok(message) => Some(exchange.on_message(message).map(Ok)),
            // A message that cannot be read (one over the size limit, say) ends the
            // exchange with its error, never with an OK close: Envoy reads that as
            // "nothing to change" and would send the request on unrewritten. On an
            // error, `failure_mode_allow: false` refuses the request instead. Envoy
            // resetting the stream ends it here too, and then no one reads the error.
            Err(status) => {
                failed = true;
                tracing::warn!(error = %status, "ext_proc: a message from Envoy could not be read");
                Some(Some(Err(status)))
            }
        });
        Ok(Response::new(Box::pin(answers.filter_map(|answer| answer))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_calls_without_the_token_are_unauthenticated() {
        use tonic::service::Interceptor;
        let mut token = TokenCheck(InternalToken::new("tok"));
        assert_eq!(token.call(Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
        let mut request = Request::new(());
        request.metadata_mut().insert(headers::INTERNAL_TOKEN, "tok".parse().unwrap());
        assert!(token.call(request).is_ok());
    }
}
