//! modelgate's load generator.
//!
//! Why our own: the figures that matter are *added* latency at a fixed offered
//! rate (which needs open-loop load corrected for coordinated omission: latency
//! is measured from when a request was due, not from when it was sent), and
//! the time to first chunk and gaps between chunks of streams. wrk is closed
//! loop only and knows nothing of SSE; this is ~200 lines on hyper.
//!
//! Prints one JSON object with the results on stdout.

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
struct Args {
    /// Full URL to POST to.
    #[arg(long)]
    url: String,
    /// JSON request body.
    #[arg(long)]
    body: String,
    /// Extra request header, `name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Open loop: requests per second, sent on schedule whatever the answers do.
    #[arg(long, conflicts_with = "concurrency")]
    rate: Option<f64>,
    /// Closed loop: this many requests in flight, each sent when the last one finished.
    #[arg(long)]
    concurrency: Option<usize>,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Unmeasured warm-up before the run, in seconds.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Most requests (and so connections) in flight at once; an open-loop
    /// request due while all are busy waits, and its wait counts in its latency.
    #[arg(long, default_value_t = 1000)]
    max_in_flight: usize,
    /// A request not answered in full within this many seconds counts as an error.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
}

/// What one run measured, in microseconds.
struct Recorder {
    latency: Histogram<u64>,
    first_chunk: Histogram<u64>,
    chunk_gap: Histogram<u64>,
    errors: u64,
}

impl Recorder {
    fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds");
        Recorder { latency: h(), first_chunk: h(), chunk_gap: h(), errors: 0 }
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().clamp(1, 120_000_000) as u64
}

fn summary(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| v as f64 / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "max_ms": ms(h.max()),
        "mean_ms": h.mean() / 1000.0,
    })
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Target {
    client: HttpClient,
    url: hyper::Uri,
    body: Bytes,
    headers: Vec<(String, String)>,
    in_flight: tokio::sync::Semaphore,
    timeout: Duration,
}

impl Target {
    /// Sends one request and reads the whole answer, timing from `due`.
    async fn hit(&self, due: Instant, recorder: &Mutex<Recorder>) {
        let Ok(_slot) = self.in_flight.acquire().await else { return };
        let mut first_chunk = None;
        let mut gaps = Vec::new();
        let ok = tokio::time::timeout(self.timeout, self.exchange(&mut first_chunk, &mut gaps)).await.unwrap_or(false);
        let done = Instant::now();
        let mut r = recorder.lock().unwrap_or_else(|p| p.into_inner());
        if !ok {
            r.errors += 1;
            return;
        }
        let _ = r.latency.record(micros(done - due));
        if let Some(first) = first_chunk {
            let _ = r.first_chunk.record(micros(first - due));
        }
        for gap in gaps {
            let _ = r.chunk_gap.record(micros(gap));
        }
    }

    /// One request and its whole answer; true if it succeeded. Notes when the
    /// first body chunk came and the gaps between later ones.
    async fn exchange(&self, first_chunk: &mut Option<Instant>, gaps: &mut Vec<Duration>) -> bool {
        let mut request = hyper::Request::post(self.url.clone()).header("content-type", "application/json");
        for (k, v) in &self.headers {
            request = request.header(k, v);
        }
        let Ok(request) = request.body(Full::new(self.body.clone())) else { return false };
        match self.client.request(request).await {
            Ok(response) => {
                let success = response.status().is_success();
                let mut body = response.into_body();
                let mut last = None;
                let mut clean = true;
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else {
                        clean = false;
                        break;
                    };
                    if frame.data_ref().is_some_and(|d| !d.is_empty()) {
                        let now = Instant::now();
                        first_chunk.get_or_insert(now);
                        if let Some(previous) = last {
                            gaps.push(now - previous);
                        }
                        last = Some(now);
                    }
                }
                success && clean
            }
            Err(_) => false,
        }
    }
}

async fn open_loop(target: Arc<Target>, rate: f64, duration: Duration, recorder: Arc<Mutex<Recorder>>) -> usize {
    // The schedule runs on its own thread with the OS's sleep: tokio's timer
    // has millisecond ticks, too coarse for sub-millisecond latencies.
    let (due_tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel();
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let count = (duration.as_secs_f64() * rate) as u32;
    std::thread::spawn(move || {
        for i in 0..count {
            let due = start + period * i;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            // Late ticks are sent at once and still timed from when they were due.
            if due_tx.send(due).is_err() {
                return;
            }
        }
    });
    let mut tasks = Vec::new();
    while let Some(due) = due_rx.recv().await {
        let (target, recorder) = (Arc::clone(&target), Arc::clone(&recorder));
        tasks.push(tokio::spawn(async move { target.hit(due, &recorder).await }));
    }
    let sent = tasks.len();
    for task in tasks {
        let _ = task.await;
    }
    sent
}

async fn closed_loop(
    target: Arc<Target>,
    concurrency: usize,
    duration: Duration,
    recorder: Arc<Mutex<Recorder>>,
) -> usize {
    let end = Instant::now() + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (target, recorder) = (Arc::clone(&target), Arc::clone(&recorder));
            tokio::spawn(async move {
                let mut sent = 0;
                while Instant::now() < end {
                    target.hit(Instant::now(), &recorder).await;
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let mut sent = 0;
    for worker in workers {
        sent += worker.await.unwrap_or(0);
    }
    sent
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // One thread: the load generator shares a small machine with what it measures.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(usize::MAX).build(connector);
    let headers = args
        .headers
        .iter()
        .filter_map(|h| h.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect();
    let target = Arc::new(Target {
        client,
        url: args.url.parse()?,
        body: Bytes::from(args.body.clone()),
        headers,
        in_flight: tokio::sync::Semaphore::new(args.max_in_flight),
        timeout: Duration::from_secs_f64(args.timeout),
    });
    let duration = Duration::from_secs_f64(args.duration);
    let warmup = Duration::from_secs_f64(args.warmup);
    let mode = match (args.rate, args.concurrency) {
        (Some(rate), _) => json!({"mode": "open", "offered_rps": rate}),
        (None, c) => json!({"mode": "closed", "concurrency": c.unwrap_or(1)}),
    };

    let discard = Arc::new(Mutex::new(Recorder::new()));
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let start;
    let sent = match (args.rate, args.concurrency) {
        (Some(rate), _) => {
            open_loop(Arc::clone(&target), rate, warmup, Arc::clone(&discard)).await;
            start = Instant::now();
            open_loop(target, rate, duration, Arc::clone(&recorder)).await
        }
        (None, c) => {
            let c = c.unwrap_or(1);
            closed_loop(Arc::clone(&target), c, warmup, Arc::clone(&discard)).await;
            start = Instant::now();
            closed_loop(target, c, duration, Arc::clone(&recorder)).await
        }
    };
    let elapsed = start.elapsed().as_secs_f64();
    let r = recorder.lock().unwrap_or_else(|p| p.into_inner());
    let warmed = discard.lock().unwrap_or_else(|p| p.into_inner()).latency.len();
    let mut out = json!({
        "sent": sent,
        "ok": r.latency.len(),
        // Requests answered during the warm-up, which the figures leave out but CPU counters see.
        "warmup_ok": warmed,
        "errors": r.errors,
        "elapsed_s": elapsed,
        "throughput_rps": r.latency.len() as f64 / elapsed,
        "latency": summary(&r.latency),
        "first_chunk": summary(&r.first_chunk),
        "chunk_gap": summary(&r.chunk_gap),
    });
    if let (Value::Object(out), Value::Object(mode)) = (&mut out, mode) {
        out.extend(mode);
    }
    println!("{out}");
    Ok(())
}
