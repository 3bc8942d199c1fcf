//! LoRA adapters loaded and unloaded on a pool's replicas: vLLM's
//! `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`, fanned out to the
//! replicas at once, each retried on its own, and reported replica by replica.
//!
//! The request is vLLM's body plus two members of the gateway's: `pool` (which
//! pool; needed only where several are configured) and, for a load,
//! `replicas` (on how many; every replica by default). What the body holds
//! besides goes on to each replica as it was sent.

use crate::pool::{Pool, Replica};
use crate::Pools;
use modelgate_proto::error::GatewayError;
use serde::Serialize;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tries per replica: the first, and retries after a 5xx or no answer.
pub const MAX_TRIES: u32 = 3;
/// The wait before the first retry, doubled before each next.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// How long one try may take: loading an adapter reads its weights.
const TRY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest replica message kept in a report.
const MAX_MESSAGE_BYTES: usize = 512;
/// Longest adapter name: it becomes a model name, in listings and records.
const MAX_LORA_NAME_BYTES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Load,
    Unload,
}

impl Action {
    fn path(self) -> &'static str {
        match self {
            Action::Load => "/v1/load_lora_adapter",
            Action::Unload => "/v1/unload_lora_adapter",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Action::Load => "load",
            Action::Unload => "unload",
        }
    }
}

/// A LoRA operation as asked, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Operation {
    pub action: Action,
    pub pool: String,
    pub lora_name: String,
    /// How many replicas to load it on; `None` for every one.
    pub replicas: Option<usize>,
    /// vLLM's body, as each replica gets it.
    pub body: Map<String, Value>,
}

impl Operation {
    /// Reads and checks a request `body` against the configured `pools`:
    /// refused in OpenAI's envelope as OpenAI refuses a bad request.
    pub fn parse(action: Action, body: &[u8], pools: &Pools) -> Result<Self, GatewayError> {
        let mut body: Map<String, Value> = match serde_json::from_slice(body) {
            Ok(Value::Object(body)) => body,
            Ok(_) => return Err(GatewayError::invalid_request("The request body must be a JSON object.".into())),
            Err(e) => return Err(GatewayError::unparsable_json(&e)),
        };
        let lora_name = required_string(&body, "lora_name")?;
        if lora_name.len() > MAX_LORA_NAME_BYTES || !lora_name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(GatewayError::invalid_value(
                "lora_name",
                format!("'lora_name' must be printable ASCII without spaces, at most {MAX_LORA_NAME_BYTES} bytes."),
            ));
        }
        if action == Action::Load {
            required_string(&body, "lora_path")?;
        }
        let pool = match body.remove("pool") {
            None | Some(Value::Null) => {
                let mut names = pools.iter().map(|p| p.name());
                match (names.next(), names.next()) {
                    (Some(only), None) => only.to_string(),
                    (None, _) => return Err(GatewayError::invalid_value("pool", "No pool is configured.".into())),
                    (Some(_), Some(_)) => return Err(GatewayError::missing_required_parameter("pool")),
                }
            }
            Some(Value::String(name)) if pools.get(&name).is_some() => name,
            Some(Value::String(_)) => {
                return Err(GatewayError::invalid_value("pool", "'pool' names no configured pool.".into()))
            }
            Some(other) => return Err(GatewayError::invalid_type("pool", "string", Some(json_type(&other)))),
        };
        let count = pools.get(&pool).map_or(0, |p| p.replicas().len());
        let replicas = match (action, body.remove("replicas")) {
            (_, None | Some(Value::Null)) => None,
            (Action::Unload, Some(_)) => {
                return Err(GatewayError::unsupported_parameter(
                    "replicas",
                    "an adapter is unloaded from every replica of its pool",
                ))
            }
            (Action::Load, Some(Value::Number(n))) => match n.as_u64().filter(|n| (1..=count as u64).contains(n)) {
                Some(n) => Some(n as usize),
                None => {
                    return Err(GatewayError::invalid_value(
                        "replicas",
                        format!("'replicas' must be a whole number from 1 to {count}, the pool's replicas."),
                    ))
                }
            },
            (Action::Load, Some(other)) => {
                return Err(GatewayError::invalid_type("replicas", "integer", Some(json_type(&other))))
            }
        };
        Ok(Operation { action, pool, lora_name, replicas, body })
    }
}

fn required_string(body: &Map<String, Value>, name: &str) -> Result<String, GatewayError> {
    match body.get(name) {
        None | Some(Value::Null) => Err(GatewayError::missing_required_parameter(name)),
        Some(Value::String(s)) if s.is_empty() => Err(GatewayError::empty_string(name)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(GatewayError::invalid_type(name, "string", Some(json_type(other)))),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// What happened on one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Loaded,
    Unloaded,
    /// Unloading an adapter the replica did not have (its 404): it is not loaded, as asked.
    NotLoaded,
    Failed,
}

/// One replica's line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaReport {
    pub replica: String,
    pub outcome: Outcome,
    pub tries: u32,
    /// The replica's last status; `null` when it never answered.
    pub status: Option<u16>,
    /// The replica's last message (its error's, or its answer's text), bounded.
    pub message: String,
}

/// The whole operation's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub object: &'static str,
    pub action: Action,
    pub pool: String,
    pub lora_name: String,
    pub replicas: Vec<ReplicaReport>,
}

impl Report {
    /// Every targeted replica ended as asked.
    pub fn succeeded(&self) -> bool {
        self.replicas.iter().all(|r| r.outcome != Outcome::Failed)
    }

    /// The client's answer: 200 and the report, or 502 with the report in the
    /// OpenAI error's `replicas`.
    pub fn to_answer(&self) -> (u16, Vec<u8>) {
        if self.succeeded() {
            return (200, serde_json::to_vec(self).unwrap_or_default());
        }
        let failed = self.replicas.iter().filter(|r| r.outcome == Outcome::Failed).count();
        let error =
            GatewayError::lora_operation_failed(self.action.verb(), &self.lora_name, failed, self.replicas.len());
        let replicas = serde_json::to_value(&self.replicas).unwrap_or_default();
        (error.status, error.to_json_with("replicas", replicas))
    }
}

/// One try's result: the replica's status and message, or why it gave none.
pub type TryResult = Result<(u16, String), String>;

/// Where an operation is sent: each replica's `try_once`.
pub trait Sender: Send + Sync + 'static {
    fn send(
        &self,
        address: &str,
        path: &'static str,
        body: Vec<u8>,
    ) -> impl std::future::Future<Output = TryResult> + Send;
}

/// Replicas over HTTP.
#[derive(Debug, Clone, Default)]
pub struct Http(pub reqwest::Client);

impl Sender for Http {
    async fn send(&self, address: &str, path: &'static str, body: Vec<u8>) -> TryResult {
        let answer = self
            .0
            .post(format!("http://{address}{path}"))
            .header("content-type", "application/json")
            .timeout(TRY_TIMEOUT)
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = answer.status().as_u16();
        let text = answer.bytes().await.map_err(|e| e.to_string())?;
        Ok((status, message_of(&text)))
    }
}

/// The message of a replica's answer: its error's (vLLM's and OpenAI's
/// shapes), or its text, bounded.
fn message_of(body: &[u8]) -> String {
    let from_json = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        [&v["error"]["message"], &v["message"], &v["detail"]].into_iter().find_map(|m| m.as_str().map(String::from))
    });
    let text = from_json.unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    bounded(text)
}

fn bounded(mut text: String) -> String {
    if text.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Runs `operation` on its pool: on every replica or on `replicas` of them
/// (the ready ones first, the least busy first), all at once; each success
/// changes the picker's view of that replica's models at once.
pub async fn run<S: Sender>(pools: &Pools, operation: Operation, sender: Arc<S>) -> Report {
    let pool = pools.get(&operation.pool).cloned();
    let targets = pool.as_deref().map(|pool| targets(pool, operation.replicas)).unwrap_or_default();
    let body = serde_json::to_vec(&operation.body).unwrap_or_default();
    let mut tasks = tokio::task::JoinSet::new();
    for (order, replica) in targets.into_iter().enumerate() {
        let (sender, body, action) = (Arc::clone(&sender), body.clone(), operation.action);
        let lora_name = operation.lora_name.clone();
        tasks.spawn(async move {
            let report = on_replica(&*sender, &replica, action, body).await;
            if report.outcome != Outcome::Failed {
                seen(&replica, action, &lora_name);
            }
            (order, report)
        });
    }
    let mut reports = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(report) => reports.push(report),
            Err(e) => tracing::error!(error = %e, "a LoRA operation's task ended without a report"),
        }
    }
    reports.sort_by_key(|(order, _)| *order);
    let replicas: Vec<ReplicaReport> = reports.into_iter().map(|(_, report)| report).collect();
    let failed = replicas.iter().filter(|r| r.outcome == Outcome::Failed).count();
    tracing::info!(
        action = operation.action.verb(),
        pool = %operation.pool,
        lora_name = %operation.lora_name,
        replicas = replicas.len(),
        failed,
        "LoRA operation"
    );
    Report {
        object: "pool.lora_operation",
        action: operation.action,
        pool: operation.pool,
        lora_name: operation.lora_name,
        replicas,
    }
}

/// The replicas an operation goes to: every one, or the first `count` of
/// them with the ready ones first, then the least busy.
fn targets(pool: &Pool, count: Option<usize>) -> Vec<Arc<Replica>> {
    let (now, stale_after) = (Instant::now(), Duration::from_millis(pool.config().stale_after_ms));
    let mut replicas: Vec<Arc<Replica>> = pool.replicas().to_vec();
    replicas.sort_by_key(|r| (!r.is_ready(now, stale_after), r.in_flight()));
    replicas.truncate(count.unwrap_or(usize::MAX));
    replicas
}

/// The picker sees what a replica now serves, without waiting for discovery
/// (where the replica's models are known at all).
fn seen(replica: &Replica, action: Action, lora_name: &str) {
    replica.update(|state| {
        if let Some(models) = &mut state.models {
            match action {
                Action::Load => models.insert(lora_name.to_string()),
                Action::Unload => models.remove(lora_name),
            };
        }
        if let (Action::Unload, Some(metrics)) = (action, &mut state.metrics) {
            metrics.active_loras.remove(lora_name);
        }
    });
}

/// Tries one replica until it answers other than with a 5xx, or its tries run out.
async fn on_replica<S: Sender>(sender: &S, replica: &Replica, action: Action, body: Vec<u8>) -> ReplicaReport {
    let mut backoff = FIRST_BACKOFF;
    let mut tries = 0;
    loop {
        tries += 1;
        let result = sender.send(&replica.address, action.path(), body.clone()).await;
        let retry = match &result {
            Ok((status, _)) => *status >= 500,
            Err(_) => true,
        };
        if !retry || tries >= MAX_TRIES {
            return report(&replica.address, action, tries, result);
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
}

fn report(replica: &str, action: Action, tries: u32, result: TryResult) -> ReplicaReport {
    let (status, message) = match result {
        Ok((status, message)) => (Some(status), message),
        Err(why) => (None, bounded(format!("no answer: {why}"))),
    };
    let outcome = match (action, status) {
        (Action::Load, Some(200..=299)) => Outcome::Loaded,
        (Action::Unload, Some(200..=299)) => Outcome::Unloaded,
        (Action::Unload, Some(404)) => Outcome::NotLoaded,
        _ => Outcome::Failed,
    };
    ReplicaReport { replica: replica.to_string(), outcome, tries, status, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    const A: &str = "10.0.0.1:8000";
    const B: &str = "10.0.0.2:8000";

    fn pools(extra: &str) -> Pools {
        Pools::from_json(
            format!(r#"{{"pools": {{"vp": {{"replicas": ["{A}", "{B}"], "discover_models": true}}{extra}}}}}"#)
                .as_bytes(),
        )
        .unwrap()
    }

    /// Replicas that answer from a script, one answer per try, and count their tries.
    #[derive(Default)]
    struct Scripted {
        answers: Mutex<HashMap<String, Vec<TryResult>>>,
        tries: Mutex<Vec<(String, &'static str, Value)>>,
    }

    impl Scripted {
        fn with(script: &[(&str, Vec<TryResult>)]) -> Arc<Self> {
            let answers = script.iter().map(|(a, r)| (a.to_string(), r.iter().rev().cloned().collect())).collect();
            Arc::new(Scripted { answers: Mutex::new(answers), tries: Mutex::default() })
        }
    }

    impl Sender for Scripted {
        async fn send(&self, address: &str, path: &'static str, body: Vec<u8>) -> TryResult {
            self.tries.lock().unwrap().push((address.into(), path, serde_json::from_slice(&body).unwrap()));
            let next = self.answers.lock().unwrap().get_mut(address).and_then(Vec::pop);
            next.unwrap_or(Ok((200, "Success".into())))
        }
    }

    fn load(body: &str, pools: &Pools) -> Result<Operation, GatewayError> {
        Operation::parse(Action::Load, body.as_bytes(), pools)
    }

    #[test]
    fn a_request_is_vllms_body_with_an_optional_pool_and_count() {
        let one = pools("");
        let op = load(r#"{"lora_name": "sql", "lora_path": "/a/sql", "replicas": 1}"#, &one).unwrap();
        assert_eq!((op.pool.as_str(), op.replicas), ("vp", Some(1)));
        assert_eq!(Value::Object(op.body), serde_json::json!({"lora_name": "sql", "lora_path": "/a/sql"}));

        let refused = |body: &str, pools: &Pools| load(body, pools).unwrap_err();
        let code = |e: GatewayError| (e.status, e.param, e.code.map(|c| c.as_str()));
        assert_eq!(code(refused(r#"{"lora_path": "/a"}"#, &one)).1.as_deref(), Some("lora_name"));
        assert_eq!(code(refused(r#"{"lora_name": "sql"}"#, &one)).1.as_deref(), Some("lora_path"));
        assert_eq!(
            code(refused(r#"{"lora_name": "two words", "lora_path": "/a"}"#, &one)).1.as_deref(),
            Some("lora_name")
        );
        for bad in ["0", "3", "-1", "1.5", "\"2\""] {
            let body = format!(r#"{{"lora_name": "sql", "lora_path": "/a", "replicas": {bad}}}"#);
            assert_eq!(code(refused(&body, &one)).1.as_deref(), Some("replicas"), "{bad}");
        }
        assert_eq!(code(refused(r#"{"lora_name": "s", "lora_path": "/a", "pool": "nope"}"#, &one)).0, 400);
        let two = pools(r#", "other": {"replicas": ["10.0.0.3:8000"]}"#);
        let missing = refused(r#"{"lora_name": "s", "lora_path": "/a"}"#, &two);
        assert_eq!(code(missing), (400, Some("pool".into()), Some("missing_required_parameter")));
        assert!(load(r#"{"lora_name": "s", "lora_path": "/a", "pool": "other"}"#, &two).is_ok());
        let unload = Operation::parse(Action::Unload, br#"{"lora_name": "s", "replicas": 1}"#, &one).unwrap_err();
        assert_eq!(unload.param.as_deref(), Some("replicas"));
        assert!(Operation::parse(Action::Unload, br#"{"lora_name": "s"}"#, &one).is_ok());
    }

    #[tokio::test]
    async fn each_replica_is_retried_on_its_own_and_reported() {
        let pools = pools("");
        pools.get("vp").unwrap().replicas()[0].update(|s| s.models = Some(["base".to_string()].into()));
        let sender = Scripted::with(&[
            (A, vec![Err("connection refused".into()), Ok((503, "busy".into()))]),
            (B, vec![Ok((500, "x".into())), Ok((500, "x".into())), Ok((500, "broken".into()))]),
        ]);
        let op = load(r#"{"lora_name": "sql", "lora_path": "/a/sql"}"#, &pools).unwrap();
        let report = run(&pools, op, Arc::clone(&sender)).await;
        let lines: Vec<_> =
            report.replicas.iter().map(|r| (r.replica.as_str(), r.outcome, r.tries, r.status)).collect();
        assert_eq!(lines, [(A, Outcome::Loaded, 3, Some(200)), (B, Outcome::Failed, 3, Some(500))]);
        assert!(sender.tries.lock().unwrap().iter().all(|(_, path, _)| *path == "/v1/load_lora_adapter"));
        let replica = |i: usize| pools.get("vp").unwrap().replicas()[i].state().models;
        assert!(replica(0).unwrap().contains("sql"), "the picker sees it at once");
        assert_eq!(replica(1), None, "unknown models stay unknown");

        let (status, body) = report.to_answer();
        assert_eq!(status, 502);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "lora_operation_failed");
        assert_eq!(body["error"]["type"], "server_error");
        assert_eq!(body["error"]["replicas"][1]["outcome"], "failed");
    }

    #[tokio::test]
    async fn a_load_on_n_replicas_and_an_unload_everywhere_that_a_replica_lacking_it_does_not_fail() {
        let pools = pools("");
        let sender = Scripted::with(&[]);
        let op = load(r#"{"lora_name": "sql", "lora_path": "/a/sql", "replicas": 1}"#, &pools).unwrap();
        let report = run(&pools, op, Arc::clone(&sender)).await;
        assert_eq!(report.replicas.len(), 1);
        assert_eq!(report.to_answer().0, 200);

        let sender = Scripted::with(&[(B, vec![Ok((404, "cannot be found".into()))])]);
        let op = Operation::parse(Action::Unload, br#"{"lora_name": "sql"}"#, &pools).unwrap();
        let report = run(&pools, op, Arc::clone(&sender)).await;
        let outcomes: Vec<_> = report.replicas.iter().map(|r| (r.outcome, r.message.as_str())).collect();
        assert_eq!(outcomes, [(Outcome::Unloaded, "Success"), (Outcome::NotLoaded, "cannot be found")]);
        let (status, body) = report.to_answer();
        assert_eq!(status, 200);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((body["object"].as_str(), body["action"].as_str()), (Some("pool.lora_operation"), Some("unload")));
    }

    #[test]
    fn a_replicas_error_message_is_read_from_its_json() {
        assert_eq!(message_of(br#"{"error": {"message": "no such adapter"}}"#), "no such adapter");
        assert_eq!(message_of(br#"{"message": "busy", "code": 503}"#), "busy");
        assert_eq!(message_of(b" Success: added. \n"), "Success: added.");
    }

    proptest! {
        #[test]
        fn any_body_is_parsed_or_refused_without_panic(body in proptest::collection::vec(any::<u8>(), 0..128)) {
            let pools = pools("");
            for action in [Action::Load, Action::Unload] {
                let _ = Operation::parse(action, &body, &pools);
            }
        }

        #[test]
        fn messages_are_bounded_on_a_character_boundary(text in "\\PC{0,700}") {
            prop_assert!(message_of(text.as_bytes()).len() <= MAX_MESSAGE_BYTES);
        }
    }
}
