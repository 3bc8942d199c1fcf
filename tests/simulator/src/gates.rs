//! Gates a test holds a stream at: with `x-sim-gate: NAME`, a stream stops
//! after its first token until `POST /sim/gates/NAME` opens the gate, so a
//! test can show that what it received came before the backend went on, with
//! no clock involved. `GET /sim/gates/NAME` says how many streams wait there.

use crate::Sim;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

#[derive(Debug, Default)]
pub struct Gates {
    gates: Mutex<HashMap<String, Arc<watch::Sender<bool>>>>,
}

impl Gates {
    fn gate(&self, name: &str) -> Arc<watch::Sender<bool>> {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        gates.entry(name.to_string()).or_insert_with(|| Arc::new(watch::channel(false).0)).clone()
    }

    /// Waits until the gate `name` is open (at once if it is).
    pub async fn pass(&self, name: &str) {
        let mut open = self.gate(name).subscribe();
        let _ = open.wait_for(|open| *open).await;
    }

    fn open(&self, name: &str) {
        self.gate(name).send_replace(true);
    }

    fn waiting(&self, name: &str) -> usize {
        let gate = self.gate(name);
        if *gate.borrow() {
            0
        } else {
            gate.receiver_count()
        }
    }
}

pub fn routes() -> Router<Arc<Sim>> {
    Router::new().route("/sim/gates/{name}", get(show).post(open))
}

async fn show(State(sim): State<Arc<Sim>>, Path(name): Path<String>) -> Response {
    Json(json!({"waiting": sim.gates.waiting(&name)})).into_response()
}

async fn open(State(sim): State<Arc<Sim>>, Path(name): Path<String>) -> Response {
    sim.gates.open(&name);
    Json(json!({"open": true})).into_response()
}
