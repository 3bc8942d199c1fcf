//! The tonic side of ext_proc: each gRPC stream's messages are answered in
//! order by one [`Exchange`], as a stream transformation — no task or channel
//! per request on this hot path.

use crate::exchange::Exchange;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use std::pin::Pin;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug)]
pub struct Processor {
    /// The longest event of a stream it translates.
    pub max_event_bytes: usize,
}

type Answers = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Processor {
    type ProcessStream = Answers;

    async fn process(&self, request: Request<Streaming<ProcessingRequest>>) -> Result<Response<Answers>, Status> {
        let mut exchange = Exchange::new(self.max_event_bytes);
        let answers = request
            .into_inner()
            // Envoy ending or resetting the stream ends the exchange.
            .map_while(|message| message.ok())
            .filter_map(move |message| exchange.on_message(message).map(Ok));
        Ok(Response::new(Box::pin(answers)))
    }
}
