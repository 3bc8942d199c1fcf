//! The tonic side of ext_proc: one task per gRPC stream, feeding each message
//! to an [`Exchange`] and sending back its answer.

use crate::exchange::Exchange;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Default)]
pub struct Processor;

#[tonic::async_trait]
impl ExternalProcessor for Processor {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        // One answer per message, so a small buffer never blocks a well-behaved Envoy.
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut exchange = Exchange::default();
            loop {
                match inbound.message().await {
                    Ok(Some(message)) => {
                        if let Some(answer) = exchange.on_message(message) {
                            if tx.send(Ok(answer)).await.is_err() {
                                break;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%status, "ext_proc stream ended by Envoy");
                        break;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
