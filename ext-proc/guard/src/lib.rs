//! modelgate's stream guard: its own process, so streams keep flowing while
//! ext-proc restarts; an HTTP relay that ends every broken stream with an
//! OpenAI error event instead of a dropped connection.
//!
//! NDJSON streams (Ollama's) are guarded the same way, ending with Ollama's own
//! `{"error": "..."}` line, which the translation turns into OpenAI's event.
//!
//! When a backend dies after its `200` has gone out, Envoy can only reset the
//! client's stream: no filter gets a say after an upstream reset. So the
//! filter sends streaming requests here, and the guard passes them to a second
//! Envoy listener that routes them as usual (load balancing, health, retries
//! before the first byte). The answer is relayed event by event; if the
//! connection breaks mid-stream, the guard drops the unfinished event, writes
//! `data: {"error":{...}}` and ends the response cleanly. The client's SDK then
//! raises `APIError` with that error, after every chunk that was sent.
//!
//! A stream whose backend needs its requests rewritten (another dialect, a
//! renamed model, an API key, defaults) is rewritten here too, as ext_proc
//! would rewrite it, and its answer translated event by event as it passes
//! (the filter then hands the guard the backend's profile in
//! [`modelgate_proto::headers::STREAM_BACKEND`] and does not engage ext_proc): the events pass
//! through the guard anyway, and ext_proc would cost two gRPC round trips
//! before the request leaves and one for every piece of the answer. Each
//! stream is framed once: by the translation when there is one, by the guard
//! when it relays the stream as it is.
//!
//! The guard's own answers (its upstream unreachable, a request without a
//! target cluster) are OpenAI errors too; every other answer passes untouched.
//!
//! What reaches the guard is trusted only as far as its own configuration
//! says: with an internal token configured, a request without it is refused;
//! keys are read only from the sources it was started with; and a client's
//! `x-envoy-*` headers are dropped, since the inner listener must route the
//! stream as configured, not as they ask (retries, timeouts, hedging).
//!
//! A stream is never dropped silently: an event longer than the guard holds
//! ends it with an error event too, and so does a shutdown. On SIGTERM the
//! guard stops accepting connections, lets open streams finish until a
//! deadline, and ends those still open then with an error event.
//!
//! Where each part lives: the [`server`] (accepting, draining), the [`relay`]
//! of one request, the fallback [`chain`] tried within the [`retry_budget`],
//! the [`rewrite`] for a backend's dialect, the [`upstream`] client to Envoy's
//! inner listener, the [`answer`] the client gets, and its [`guarded_body`].

pub mod answer;
pub mod chain;
pub mod guarded_body;
pub mod relay;
pub mod retry_budget;
pub mod rewrite;
pub mod server;
#[cfg(test)]
mod testing;
pub mod upstream;
