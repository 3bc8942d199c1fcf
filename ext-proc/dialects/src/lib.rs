//! modelgate's backend dialects. A client speaks OpenAI; a backend may speak
//! another API. The [`dialect`] module holds the interface every dialect
//! implements, one file per dialect implements it ([`openai`], [`anthropic`],
//! [`ollama`]) with the helpers they share ([`params`] for requests, [`stream`]
//! for answers), and a [`call`] is one request's use of it with the backend's
//! key from the [`credentials`] this process may read. A client that speaks
//! another API (OpenAI's Responses, Anthropic's Messages) to a backend that
//! does not serve it goes through chat completions: [`client`] translates.
//!
//! Nothing here does I/O: ext-proc drives a call from Envoy's messages, the
//! stream guard from the bytes it relays, and both get the same rewrite.

pub mod anthropic;
pub mod call;
pub mod client;
pub mod credentials;
pub mod dialect;
pub mod ollama;
pub mod openai;
pub mod params;
pub mod stream;
