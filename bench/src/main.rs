//! modelgate's load generator.
//!
//! Why our own: the figures that matter are *added* latency at a fixed offered
//! rate (which needs open-loop load corrected for coordinated omission: latency
//! is measured from when a request was due, not from when it was sent), and
//! the time to first chunk and gaps between chunks of streams. wrk is closed
//! loop only and knows nothing of SSE; this is ~300 lines on hyper.
//!
//! With `--conversations`, it plays multi-turn chats instead of one body: each
//! worker takes the next conversation and sends its turns one after another,
//! as a chat client resending its history does.
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
    #[arg(long, required_unless_present = "conversations")]
    body: Option<String>,
    /// JSON lines, one conversation each: `{"headers": {name: value}, "turns": [body, ...]}`.
    /// Closed loop only; the run ends when every conversation is done or the duration is up.
    #[arg(long, conflicts_with_all = ["body", "rate"])]
    conversations: Option<std::path::PathBuf>,
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
    /// Time to the first chunk carrying generated text (a chat stream's first
    /// chunk has only the role): what a user waits before reading.
    first_content: Histogram<u64>,
    /// Chunks carrying generated text: one token each from the simulator.
    content_chunks: u64,
    errors: u64,
}

impl Recorder {
    fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds");
        Recorder { latency: h(), first_chunk: h(), chunk_gap: h(), first_content: h(), content_chunks: 0, errors: 0 }
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

/// Pieces of generated text in an SSE chunk: `"content":"` followed by at
/// least one character (the role chunk's content is empty).
fn content_pieces(data: &[u8]) -> u64 {
    const KEY: &[u8] = b"\"content\":\"";
    data.windows(KEY.len() + 1).filter(|w| w.starts_with(KEY) && w[KEY.len()] != b'"').count() as u64
}

/// One request's body and headers of its own (a conversation's session, say).
struct Call {
    body: Bytes,
    headers: Vec<(String, String)>,
}

/// What one exchange saw of its answer.
#[derive(Default)]
struct Seen {
    first_chunk: Option<Instant>,
    first_content: Option<Instant>,
    gaps: Vec<Duration>,
    content_chunks: u64,
}

struct Target {
    client: HttpClient,
    url: hyper::Uri,
    call: Call,
    headers: Vec<(String, String)>,
    in_flight: tokio::sync::Semaphore,
    timeout: Duration,
}

impl Target {
    /// Sends the run's request and reads the whole answer, timing from `due`.
    async fn hit(&self, due: Instant, recorder: &Mutex<Recorder>) -> bool {
        self.send(&self.call, due, recorder).await
    }

    /// Sends one request and reads the whole answer, timing from `due`; true if it succeeded.
    async fn send(&self, call: &Call, due: Instant, recorder: &Mutex<Recorder>) -> bool {
        let Ok(_slot) = self.in_flight.acquire().await else { return false };
        let mut seen = Seen::default();
        let ok = tokio::time::timeout(self.timeout, self.exchange(call, &mut seen)).await.unwrap_or(false);
        let done = Instant::now();
        let mut r = recorder.lock().unwrap_or_else(|p| p.into_inner());
        if !ok {
            r.errors += 1;
            return false;
        }
        let _ = r.latency.record(micros(done - due));
        if let Some(first) = seen.first_chunk {
            let _ = r.first_chunk.record(micros(first - due));
        }
        if let Some(first) = seen.first_content {
            let _ = r.first_content.record(micros(first - due));
        }
        for gap in seen.gaps {
            let _ = r.chunk_gap.record(micros(gap));
        }
        r.content_chunks += seen.content_chunks;
        true
    }

    /// One request and its whole answer; true if it succeeded. Notes when the
    /// first body chunk and the first generated text came, and the gaps between chunks.
    async fn exchange(&self, call: &Call, seen: &mut Seen) -> bool {
        let mut request = hyper::Request::post(self.url.clone()).header("content-type", "application/json");
        for (k, v) in self.headers.iter().chain(&call.headers) {
            request = request.header(k, v);
        }
        let Ok(request) = request.body(Full::new(call.body.clone())) else { return false };
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
                    if let Some(data) = frame.data_ref().filter(|d| !d.is_empty()) {
                        let now = Instant::now();
                        seen.first_chunk.get_or_insert(now);
                        if let Some(previous) = last {
                            seen.gaps.push(now - previous);
                        }
                        last = Some(now);
                        let pieces = content_pieces(data);
                        if pieces > 0 {
                            seen.first_content.get_or_insert(now);
                            seen.content_chunks += pieces;
                        }
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

/// Conversations played by `concurrency` workers, each taking the next one
/// when its last is done; a conversation's turns go one after another. A
/// failed turn ends its conversation (its history would be a lie).
async fn conversations_loop(
    target: Arc<Target>,
    conversations: Vec<Vec<Call>>,
    concurrency: usize,
    duration: Duration,
    recorder: Arc<Mutex<Recorder>>,
) -> (usize, usize) {
    let end = Instant::now() + duration;
    let queue = Arc::new(Mutex::new(conversations.into_iter()));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (target, recorder, queue) = (Arc::clone(&target), Arc::clone(&recorder), Arc::clone(&queue));
            tokio::spawn(async move {
                let (mut sent, mut finished) = (0, 0);
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                    let Some(turns) = next else { break };
                    let mut complete = true;
                    for call in &turns {
                        if Instant::now() >= end {
                            return (sent, finished);
                        }
                        sent += 1;
                        if !target.send(call, Instant::now(), &recorder).await {
                            complete = false;
                            break;
                        }
                    }
                    finished += usize::from(complete);
                }
                (sent, finished)
            })
        })
        .collect();
    let (mut sent, mut finished) = (0, 0);
    for worker in workers {
        let (s, f) = worker.await.unwrap_or((0, 0));
        sent += s;
        finished += f;
    }
    (sent, finished)
}

/// The conversations of a `--conversations` file.
fn read_conversations(path: &std::path::Path) -> Result<Vec<Vec<Call>>, Box<dyn std::error::Error>> {
    let mut conversations = Vec::new();
    for line in std::fs::read_to_string(path)?.lines().filter(|l| !l.trim().is_empty()) {
        let conversation: Value = serde_json::from_str(line)?;
        let headers: Vec<(String, String)> = conversation["headers"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect();
        let turns = conversation["turns"].as_array().ok_or("a conversation without turns")?;
        conversations.push(
            turns.iter().map(|body| Call { body: Bytes::from(body.to_string()), headers: headers.clone() }).collect(),
        );
    }
    Ok(conversations)
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
        call: Call { body: Bytes::from(args.body.clone().unwrap_or_default()), headers: Vec::new() },
        headers,
        in_flight: tokio::sync::Semaphore::new(args.max_in_flight),
        timeout: Duration::from_secs_f64(args.timeout),
    });
    let duration = Duration::from_secs_f64(args.duration);
    let warmup = Duration::from_secs_f64(args.warmup);
    let mut mode = match (args.rate, args.concurrency) {
        (Some(rate), _) => json!({"mode": "open", "offered_rps": rate}),
        (None, c) => json!({"mode": "closed", "concurrency": c.unwrap_or(1)}),
    };

    let discard = Arc::new(Mutex::new(Recorder::new()));
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let start;
    let sent = match (args.rate, args.concurrency, &args.conversations) {
        (_, c, Some(path)) => {
            let conversations = read_conversations(path)?;
            let total = conversations.len();
            start = Instant::now();
            let (sent, finished) =
                conversations_loop(target, conversations, c.unwrap_or(1), duration, Arc::clone(&recorder)).await;
            mode["conversations"] = json!(total);
            mode["conversations_finished"] = json!(finished);
            sent
        }
        (Some(rate), _, None) => {
            open_loop(Arc::clone(&target), rate, warmup, Arc::clone(&discard)).await;
            start = Instant::now();
            open_loop(target, rate, duration, Arc::clone(&recorder)).await
        }
        (None, c, None) => {
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
        "first_content": summary(&r.first_content),
        "output_tokens": r.content_chunks,
        "output_tokens_per_s": r.content_chunks as f64 / elapsed,
    });
    if let (Value::Object(out), Value::Object(mode)) = (&mut out, mode) {
        out.extend(mode);
    }
    println!("{out}");
    Ok(())
}
