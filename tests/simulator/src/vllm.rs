//! vLLM's operational API beside the OpenAI one: loading and unloading LoRA
//! adapters at run time, and `/tokenize` and `/detokenize`, with vLLM's
//! answers and errors.

use crate::call::{self, pause};
use crate::failure::vllm_error;
use crate::openai::OpenAi;
use crate::{generate, tokenizer, Sim};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/v1/load_lora_adapter", post(load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(unload_lora_adapter))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
}

/// The LoRA adapters loaded, by name, with the path each was loaded from.
#[derive(Debug, Default)]
pub struct Adapters {
    loaded: Mutex<BTreeMap<String, String>>,
    load_calls: AtomicU32,
}

impl Adapters {
    pub fn path(&self, name: &str) -> Option<String> {
        self.lock().get(name).cloned()
    }

    pub fn list(&self) -> Vec<(String, String)> {
        self.lock().iter().map(|(name, path)| (name.clone(), path.clone())).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A JSON body of the admin endpoints, or vLLM's 400.
#[allow(clippy::result_large_err)] // the error is the finished answer
fn fields(bytes: &[u8]) -> Result<Value, Response> {
    serde_json::from_slice(bytes).map_err(|e| vllm_error(400, &format!("invalid JSON body: {e}")))
}

async fn load_lora_adapter(State(sim): State<Arc<Sim>>, body: axum::body::Bytes) -> Result<Response, Response> {
    let body = fields(&body)?;
    let (Some(name), Some(path)) = (body["lora_name"].as_str(), body["lora_path"].as_str()) else {
        return Err(vllm_error(400, "Both 'lora_name' and 'lora_path' must be provided."));
    };
    if sim.adapters.path(name).is_some() {
        return Err(vllm_error(400, &format!("The lora adapter '{name}' has already been loaded.")));
    }
    pause(Duration::from_millis(sim.settings.lora_load_ms)).await;
    if sim.adapters.load_calls.fetch_add(1, Ordering::Relaxed) < sim.settings.lora_load_failures {
        return Err(vllm_error(503, &format!("Loading lora {name} failed: simulated failure")));
    }
    sim.adapters.lock().insert(name.to_string(), path.to_string());
    Ok(format!("Success: LoRA adapter '{name}' added successfully.").into_response())
}

async fn unload_lora_adapter(State(sim): State<Arc<Sim>>, body: axum::body::Bytes) -> Result<Response, Response> {
    let body = fields(&body)?;
    let Some(name) = body["lora_name"].as_str() else {
        return Err(vllm_error(400, "'lora_name' needs to be provided to unload a LoRA adapter."));
    };
    if sim.adapters.lock().remove(name).is_none() {
        return Err(vllm_error(404, &format!("The lora adapter '{name}' cannot be found.")));
    }
    Ok(format!("Success: LoRA adapter '{name}' removed successfully.").into_response())
}

type Call = call::Call<OpenAi>;

async fn tokenize(State(sim): State<Arc<Sim>>, call: Call) -> Result<Response, Response> {
    let text = match (&call.body["prompt"], call.body["messages"].as_array()) {
        (Value::String(prompt), _) => prompt.clone(),
        (_, Some(messages)) => generate::chat_prompt(messages),
        _ => return Err(vllm_error(400, "Either `prompt` (a string) or `messages` is required")),
    };
    let (tokens, strs) = tokenizer::Vocabulary::global().tokenize(&text);
    let token_strs = (call.body["return_token_strs"].as_bool() == Some(true)).then_some(strs);
    Ok(Json(json!({"count": tokens.len(), "max_model_len": sim.settings.max_model_len,
                   "tokens": tokens, "token_strs": token_strs}))
    .into_response())
}

async fn detokenize(call: Call) -> Result<Response, Response> {
    let tokens = call.required("tokens")?.as_array().ok_or_else(|| vllm_error(400, "`tokens` must be a list"))?;
    let ids: Vec<u32> =
        tokens.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()).unwrap_or(u32::MAX)).collect();
    let prompt = tokenizer::Vocabulary::global()
        .detokenize(&ids)
        .map_err(|id| vllm_error(400, &format!("Token id {id} is out of vocabulary")))?;
    Ok(Json(json!({"prompt": prompt})).into_response())
}
