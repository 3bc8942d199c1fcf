//! The tonic side of ext_proc: each gRPC stream's messages are answered in
//! order by one [`Exchange`], as a stream transformation — no task or channel
//! per request on this hot path, and each answer awaited (only the stored
//! responses' reads and writes ever wait) before the next message is read.

use crate::endpoint_picker::EndpointPicker;
use crate::exchange::Exchange;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use modelgate_batch::responses::Responses;
use modelgate_dialects::credentials::KeySources;
use modelgate_pools::pool::Pool;
use modelgate_pools::Pools;
use modelgate_proto::headers;
use modelgate_runtime::internal_token::InternalToken;
use modelgate_runtime::process::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::{Stream, StreamExt};
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

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
    /// The Responses API's stored responses, in the batch metadata store.
    pub responses: Arc<Responses>,
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

/// The endpoint-picker protocol's service for one pool, on a port of its own.
/// It takes no internal token: the Gateway API data planes that call it
/// cannot present one (docs/deployment.md says where it may listen).
#[derive(Debug)]
pub struct PoolPicker {
    pub pool: Arc<Pool>,
}

/// The endpoint picker's gRPC service, its messages either way of up to `max_message_bytes`.
pub fn endpoint_picker_server(picker: PoolPicker, max_message_bytes: usize) -> ExternalProcessorServer<PoolPicker> {
    ExternalProcessorServer::new(picker)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
}

/// The gRPC health services of the endpoint picker's port: `liveness` while
/// the process serves; `readiness`, and ext_proc's service name, while the
/// pool has a ready replica and the process is not stopping (so, like
/// `/readyz`, they fail during the drain delay), checked every scrape
/// interval until the servers stop.
pub async fn report_health(reporter: HealthReporter, pool: Arc<Pool>, shutdown: Shutdown) {
    const EXT_PROC: &str = <ExternalProcessorServer<PoolPicker> as NamedService>::NAME;
    reporter.set_service_status("liveness", ServingStatus::Serving).await;
    let mut every = tokio::time::interval(Duration::from_millis(pool.config().scrape_interval_ms.max(1)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = None;
    let stopped = shutdown.asked();
    let watch = async {
        loop {
            every.tick().await;
            let ready = shutdown.ready() && pool.is_ready(Instant::now());
            if reported != Some(ready) {
                let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
                for service in ["readiness", EXT_PROC] {
                    reporter.set_service_status(service, status).await;
                }
                reported = Some(ready);
            }
        }
    };
    tokio::select! {
        () = watch => {}
        () = stopped => {}
    }
}

#[tonic::async_trait]
impl ExternalProcessor for PoolPicker {
    type ProcessStream = Answers;

    async fn process(&self, request: Request<Streaming<ProcessingRequest>>) -> Result<Response<Answers>, Status> {
        let mut picker = EndpointPicker::new(Arc::clone(&self.pool));
        let mut failed = false;
        // As for `Processor`: an unreadable message ends the exchange with its error.
        let answers = request.into_inner().map_while(move |message| match message {
            _ if failed => None,
            Ok(message) => Some(picker.on_message(message, Instant::now()).into_iter().map(Ok).collect()),
            Err(status) => {
                failed = true;
                tracing::warn!(error = %status, "endpoint picker: a message from the data plane could not be read");
                Some(vec![Err(status)])
            }
        });
        Ok(Response::new(Box::pin(futures_util::StreamExt::flat_map(answers, futures_util::stream::iter))))
    }
}

#[tonic::async_trait]
impl ExternalProcessor for Processor {
    type ProcessStream = Answers;

    async fn process(&self, request: Request<Streaming<ProcessingRequest>>) -> Result<Response<Answers>, Status> {
        let exchange = Exchange::new(
            Arc::clone(&self.keys),
            Arc::clone(&self.pools),
            Arc::clone(&self.responses),
            self.max_event_bytes,
        );
        let answers = futures_util::stream::unfold(Some((request.into_inner(), exchange)), |state| async move {
            let (mut messages, mut exchange) = state?;
            loop {
                match messages.next().await? {
                    Ok(message) => {
                        if let Some(answer) = exchange.on_message(message).await {
                            return Some((Ok(answer), Some((messages, exchange))));
                        }
                    }
                    // A message that cannot be read (one over the size limit, say) ends the
                    // exchange with its error, never with an OK close: Envoy reads that as
                    // "nothing to change" and would send the request on unrewritten. On an
                    // error, `failure_mode_allow: false` refuses the request instead. Envoy
                    // resetting the stream ends it here too, and then no one reads the error.
                    Err(status) => {
                        tracing::warn!(error = %status, "ext_proc: a message from Envoy could not be read");
                        return Some((Err(status), None));
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(answers)))
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

    #[tokio::test]
    async fn the_endpoint_pickers_port_answers_health_checks_and_picks() {
        use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
        use envoy_types::pb::envoy::service::ext_proc::v3::{processing_request, processing_response, HttpHeaders};
        use tonic_health::pb::health_check_response::ServingStatus as Status;
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

        let pools = Pools::from_json(
            br#"{"pools": {"p": {"replicas": ["10.0.0.1:8000"], "scrape_interval_ms": 10, "stale_after_ms": 600000}}}"#,
        )
        .unwrap();
        let pool = Arc::clone(pools.get("p").unwrap());
        let (reporter, health) = tonic_health::server::health_reporter();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let picker = endpoint_picker_server(PoolPicker { pool: Arc::clone(&pool) }, DEFAULT_MAX_MESSAGE_BYTES);
        let server = tonic::transport::Server::builder().add_service(health).add_service(picker);
        tokio::spawn(server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
        let (ask, asked) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::after(async { asked.await.unwrap_or(()) }, Duration::from_secs(600));
        tokio::spawn(report_health(reporter, Arc::clone(&pool), shutdown));

        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
        let mut health = HealthClient::new(channel.clone());
        let mut status_of = async |service: &str| {
            let request = HealthCheckRequest { service: service.to_string() };
            health.check(request).await.ok().map(|answer| answer.into_inner().status())
        };
        // Nothing scraped yet: alive, not ready.
        while status_of("readiness").await != Some(Status::NotServing) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(status_of("liveness").await, Some(Status::Serving));
        assert_eq!(status_of("envoy.service.ext_proc.v3.ExternalProcessor").await, Some(Status::NotServing));

        pool.replicas()[0].update(|state| {
            state.metrics = Some(Default::default());
            state.scraped_at = Some(Instant::now());
        });
        while status_of("readiness").await != Some(Status::Serving) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(status_of("envoy.service.ext_proc.v3.ExternalProcessor").await, Some(Status::Serving));

        // SIGTERM: during the drain delay the picker still answers, but reports itself unready.
        ask.send(()).unwrap();
        while status_of("readiness").await != Some(Status::NotServing) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(status_of("envoy.service.ext_proc.v3.ExternalProcessor").await, Some(Status::NotServing));
        assert_eq!(status_of("liveness").await, Some(Status::Serving));

        // A request without a body is answered at its headers, with no token asked.
        let headers = ProcessingRequest {
            request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
                end_of_stream: true,
                ..Default::default()
            })),
            ..Default::default()
        };
        let mut answers =
            ExternalProcessorClient::new(channel).process(tokio_stream::iter([headers])).await.unwrap().into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        assert!(matches!(answer.response, Some(processing_response::Response::RequestHeaders(_))));
        assert!(answer.dynamic_metadata.is_some());
    }
}
