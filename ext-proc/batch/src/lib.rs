//! modelgate's Files and Batch APIs, and the Responses API's stored responses, beside ext_proc.
//!
//! - [`api`]: `/v1/files`, `/v1/batches` and `/v1/responses/{id}`, served on ext-proc's admin port
//!   and reached through Envoy's listener (the filter checks the client's key
//!   and names its owner).
//! - [`store`]: batch and file metadata, in SQLite on one machine or in Redis
//!   shared by several replicas; [`blobs`]: file contents, on local disk or in
//!   object storage; [`responses`]: the stored responses, in the same metadata store.
//! - [`runner`]: runs each batch, holding a lease so one replica runs it at a
//!   time, and sends every line through Envoy's listener as the batch's owner.

pub mod api;
pub mod args;
pub mod blobs;
pub mod ids;
pub mod responses;
pub mod runner;
pub mod store;

use args::BatchArgs;
use blobs::Blobs;
use modelgate_runtime::internal_token::InternalToken;
use responses::Responses;
use runner::gateway::Gateway;
use runner::{Runner, Settings};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use store::Meta;
use tokio::sync::Notify;

/// Longest wait for the batch store in one call. Longer than the rate limits'
/// (a save writes several keys), and past it the call fails: a 503 to a client,
/// a pause for a runner.
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// Files and batches as ext-proc serves and runs them: the stores, the API, the runner.
pub struct Batches {
    args: BatchArgs,
    meta: Arc<Meta>,
    blobs: Arc<Blobs>,
    /// The token the runner presents to Envoy's listener.
    secret: Option<String>,
    token: InternalToken,
    wake: Arc<Notify>,
}

impl Batches {
    /// Opens the stores: metadata in Redis when `redis_url` is set, else in
    /// SQLite under `data_dir`; files where `args` says.
    pub fn open(
        args: &BatchArgs,
        data_dir: &Path,
        redis_url: Option<&str>,
        secret: Option<String>,
        token: InternalToken,
    ) -> Result<Self, String> {
        let meta = Meta::open(redis_url, data_dir, STORE_TIMEOUT)?;
        let location = args.files_location(data_dir);
        let blobs = Blobs::open(&location).map_err(|e| format!("opening file storage at {location}: {e}"))?;
        Ok(Batches {
            args: args.clone(),
            meta: Arc::new(meta),
            blobs: Arc::new(blobs),
            secret,
            token,
            wake: Arc::new(Notify::new()),
        })
    }

    /// The stored responses, for ext_proc: kept in the same store the API serves them from.
    pub fn responses(&self) -> Responses {
        Responses::new(self.meta.clone(), self.args.responses_retention())
    }

    /// `/v1/files`, `/v1/batches` and `/v1/responses/{id}`, for the admin port.
    pub fn api(&self) -> axum::Router {
        api::router(Arc::new(api::Api {
            meta: self.meta.clone(),
            blobs: self.blobs.clone(),
            max_file_bytes: self.args.files_max_bytes,
            window: self.args.window(),
            wake: self.wake.clone(),
            token: self.token.clone(),
        }))
    }

    /// The runner of this replica's batches.
    pub fn runner(&self) -> Result<Runner, String> {
        let settings = Settings {
            gateway: Gateway::new(&self.args.gateway_url, self.secret.clone())?,
            concurrency: usize::try_from(self.args.batch_concurrency).unwrap_or(usize::MAX),
            max_running: usize::try_from(self.args.batch_max_running).unwrap_or(usize::MAX),
            line_attempts: self.args.batch_line_attempts,
            max_lines: self.args.batch_max_lines,
            lease: self.args.lease(),
        };
        Ok(Runner::new(self.meta.clone(), self.blobs.clone(), settings, self.wake.clone()))
    }
}
