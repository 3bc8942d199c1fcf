//! The floor of an ext_proc service, for `make bench`: every message Envoy
//! sends is answered "continue", changing nothing. On the rename route's
//! ext_proc settings it is the least modelgate's ext_proc routes can cost.

use clap::Parser;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request, processing_response, ProcessingRequest, ProcessingResponse,
};
use std::net::SocketAddr;
use std::pin::Pin;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

#[derive(Parser)]
#[command(about = "An ext_proc service that answers every message with \"continue\"")]
struct Args {
    /// Address the gRPC server listens on.
    #[arg(long)]
    listen: SocketAddr,
}

struct Continue;

/// The answer that lets `message` go on unchanged.
fn carry_on(message: ProcessingRequest) -> ProcessingResponse {
    use processing_request::Request as Message;
    use processing_response::Response as Answer;
    let answer = message.request.map(|request| match request {
        Message::RequestHeaders(_) => Answer::RequestHeaders(Default::default()),
        Message::ResponseHeaders(_) => Answer::ResponseHeaders(Default::default()),
        Message::RequestBody(_) => Answer::RequestBody(Default::default()),
        Message::ResponseBody(_) => Answer::ResponseBody(Default::default()),
        Message::RequestTrailers(_) => Answer::RequestTrailers(Default::default()),
        Message::ResponseTrailers(_) => Answer::ResponseTrailers(Default::default()),
    });
    ProcessingResponse { response: answer, ..Default::default() }
}

type Answers = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Continue {
    type ProcessStream = Answers;

    async fn process(&self, request: Request<Streaming<ProcessingRequest>>) -> Result<Response<Answers>, Status> {
        Ok(Response::new(Box::pin(request.into_inner().map(|message| message.map(carry_on)))))
    }
}

/// One worker thread, as `make bench` runs modelgate's ext-proc.
#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), tonic::transport::Error> {
    let args = Args::parse();
    tonic::transport::Server::builder().add_service(ExternalProcessorServer::new(Continue)).serve(args.listen).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use processing_request::Request as Message;
    use processing_response::Response as Answer;

    #[test]
    fn every_message_is_answered_in_kind_and_changes_nothing() {
        let answer = |message| carry_on(ProcessingRequest { request: Some(message), ..Default::default() });
        assert_eq!(
            answer(Message::RequestHeaders(Default::default())).response,
            Some(Answer::RequestHeaders(Default::default()))
        );
        assert_eq!(
            answer(Message::RequestBody(Default::default())).response,
            Some(Answer::RequestBody(Default::default()))
        );
        assert_eq!(
            answer(Message::ResponseTrailers(Default::default())).response,
            Some(Answer::ResponseTrailers(Default::default()))
        );
    }
}
