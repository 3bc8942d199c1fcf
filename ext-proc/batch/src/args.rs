//! ext-proc's command-line options for files and batches.

use std::path::Path;
use std::time::Duration;

/// Where files are kept, what they and batches may hold, and how batches run.
#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// Where file contents are kept: a local directory, or an object store's URL
    /// (`s3://bucket/prefix`, `gs://bucket`, `az://container`) with its
    /// credentials in the environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
    /// Default: `files/` under `--data-dir`.
    #[arg(long, env = "MODELGATE_FILES_URL")]
    pub files_url: Option<String>,
    /// Envoy's OpenAI listener, where the batch runner sends each line as a
    /// client request, so routing, limits and accounting apply to it.
    #[arg(long, env = "MODELGATE_GATEWAY_URL", default_value = "http://127.0.0.1:10000")]
    pub gateway_url: String,
    /// Largest file an upload may hold, in bytes (OpenAI's 200 MB).
    #[arg(long, env = "MODELGATE_FILES_MAX_BYTES", default_value_t = 200 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub files_max_bytes: u64,
    /// Most lines a batch's input file may hold.
    #[arg(long, env = "MODELGATE_BATCH_MAX_LINES", default_value_t = 50_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_max_lines: u64,
    /// Lines of one batch in flight at once.
    #[arg(long, env = "MODELGATE_BATCH_CONCURRENCY", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub batch_concurrency: u64,
    /// Batches this ext-proc runs at once; others wait, or run on other replicas.
    #[arg(long, env = "MODELGATE_BATCH_MAX_RUNNING", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(1..=256))]
    pub batch_max_running: u64,
    /// Tries a line gets when the gateway answers it with a retryable error
    /// (a 5xx, or `x-should-retry: true`) before it goes to the error file.
    /// A 429 waits its `retry-after` and is not counted.
    #[arg(long, env = "MODELGATE_BATCH_LINE_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=100))]
    pub batch_line_attempts: u64,
    /// Seconds a batch may take (its `completion_window`, "24h"); past them it expires.
    #[arg(long, env = "MODELGATE_BATCH_WINDOW_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_window_secs: u64,
    /// Seconds a replica's hold on a running batch lasts unless renewed; after
    /// a replica dies, another takes its batches over within about this long.
    #[arg(long, env = "MODELGATE_BATCH_LEASE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub batch_lease_secs: u64,
    /// Days the Responses API's stored responses are kept (OpenAI keeps them
    /// 30): until then `GET /v1/responses/{id}` and `previous_response_id` find them.
    #[arg(long, env = "MODELGATE_RESPONSES_RETENTION_DAYS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3650))]
    pub responses_retention_days: u64,
}

impl BatchArgs {
    /// Where file contents are kept, `files/` under `data_dir` by default.
    pub fn files_location(&self, data_dir: &Path) -> String {
        self.files_url.clone().unwrap_or_else(|| data_dir.join("files").to_string_lossy().into_owned())
    }

    pub fn window(&self) -> Duration {
        Duration::from_secs(self.batch_window_secs)
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.batch_lease_secs)
    }

    pub fn responses_retention(&self) -> Duration {
        Duration::from_secs(self.responses_retention_days.saturating_mul(86_400))
    }
}
