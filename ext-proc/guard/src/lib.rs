//! modelgate's stream guard: its own process, so streams keep flowing while
//! ext-proc restarts. The [`relay`] takes a streaming request from the filter,
//! rewrites it as ext-proc would, sends it to Envoy's inner listener (trying
//! a model's fallbacks within the [`retry_budget`]), and ends a stream the
//! backend breaks off with an OpenAI error event.

pub mod relay;
pub mod retry_budget;
