//! What ext-proc must know about a request's backend to rewrite it: the API
//! dialect it speaks, the model name it expects, where its API key comes from,
//! and default parameters.
//!
//! The filter computes one [`BackendProfile`] per configured model route when
//! it loads its configuration, and hands it to ext-proc as the JSON value of
//! the [`crate::headers::BACKEND`] request header. Requests whose backend needs
//! none of this carry no such header, and ext_proc is never engaged for them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The API a backend speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// OpenAI's API: vLLM, SGLang, llama.cpp server, OpenAI and compatible providers.
    #[default]
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
    /// Ollama's native API (`/api/chat`, `/api/generate`, `/api/embed`).
    Ollama,
}

/// Where the key a backend is called with comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiKey {
    /// An environment variable of the ext-proc process.
    Env(String),
    /// A file readable by ext-proc (a mounted secret); surrounding whitespace is ignored.
    File(String),
    /// The client's own key, as it sent it.
    Passthrough,
}

/// Everything ext-proc needs to rewrite a request for its backend.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendProfile {
    #[serde(default, skip_serializing_if = "is_openai")]
    pub dialect: Dialect,
    /// The model name the backend expects, when it differs from the client's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKey>,
    /// Request parameters set when the client sent none (for example Anthropic's required `max_tokens`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub defaults: Map<String, Value>,
    /// The self-hosted pool (a name in ext-proc's `--pools` file) whose
    /// replica ext-proc picks for each request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The backend serves OpenAI's Responses API itself (OpenAI, recent vLLM):
    /// `/v1/responses` passes through instead of being translated.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub serves_responses: bool,
}

fn is_openai(dialect: &Dialect) -> bool {
    *dialect == Dialect::Openai
}

impl BackendProfile {
    /// True when requests to this backend pass through untouched, without ext_proc.
    pub fn is_passthrough(&self) -> bool {
        self.model.is_none() && self.needs_no_more_than_a_rename()
    }

    /// The model name the backend expects, when renaming is all its requests
    /// need: the filter then renames them itself, without ext_proc.
    pub fn rename_only(&self) -> Option<&str> {
        self.model.as_deref().filter(|_| self.needs_no_more_than_a_rename())
    }

    /// Nothing but the model's name may need changing: the backend speaks
    /// OpenAI's API, takes the client's key or none, and has no defaults or pool.
    fn needs_no_more_than_a_rename(&self) -> bool {
        self.dialect == Dialect::Openai
            && matches!(self.api_key, None | Some(ApiKey::Passthrough))
            && self.defaults.is_empty()
            && self.pool.is_none()
    }

    /// The profile as the value of the internal header.
    pub fn to_header(&self) -> String {
        // A struct of strings and JSON values always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_header(value: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn profiles_round_trip_through_the_header_compactly() {
        let profile = BackendProfile {
            dialect: Dialect::Anthropic,
            model: Some("claude-sonnet-4-6".into()),
            api_key: Some(ApiKey::Env("ANTHROPIC_API_KEY".into())),
            defaults: json!({"max_tokens": 4096}).as_object().cloned().unwrap(),
            pool: None,
            serves_responses: false,
        };
        let header = profile.to_header();
        assert_eq!(
            header,
            r#"{"dialect":"anthropic","model":"claude-sonnet-4-6","api_key":{"env":"ANTHROPIC_API_KEY"},"defaults":{"max_tokens":4096}}"#
        );
        assert_eq!(BackendProfile::from_header(header.as_bytes()).unwrap(), profile);
        let rename = BackendProfile { model: Some("m".into()), ..Default::default() };
        assert_eq!(rename.to_header(), r#"{"model":"m"}"#);
    }

    #[test]
    fn only_a_plain_openai_backend_needs_no_rewriting() {
        assert!(BackendProfile::default().is_passthrough());
        assert!(BackendProfile { api_key: Some(ApiKey::Passthrough), ..Default::default() }.is_passthrough());
        assert!(!BackendProfile { dialect: Dialect::Ollama, ..Default::default() }.is_passthrough());
        assert!(!BackendProfile { api_key: Some(ApiKey::File("/k".into())), ..Default::default() }.is_passthrough());
    }

    #[test]
    fn only_a_rename_of_a_plain_openai_backend_is_left_to_the_filter() {
        let rename = BackendProfile { model: Some("m".into()), ..Default::default() };
        assert_eq!(rename.rename_only(), Some("m"));
        let passthrough_key = BackendProfile { api_key: Some(ApiKey::Passthrough), ..rename.clone() };
        assert_eq!(passthrough_key.rename_only(), Some("m"));
        assert_eq!(BackendProfile::default().rename_only(), None);
        for more in [
            BackendProfile { api_key: Some(ApiKey::Env("K".into())), ..rename.clone() },
            BackendProfile { dialect: Dialect::Anthropic, ..rename.clone() },
            BackendProfile { pool: Some("p".into()), ..rename.clone() },
            BackendProfile { defaults: json!({"n": 1}).as_object().cloned().unwrap(), ..rename.clone() },
        ] {
            assert_eq!(more.rename_only(), None, "{more:?}");
        }
    }

    #[test]
    fn api_key_sources_are_spelled_as_in_the_configuration() {
        let parse = |v: Value| serde_json::from_value::<ApiKey>(v);
        assert_eq!(parse(json!({"env": "K"})).unwrap(), ApiKey::Env("K".into()));
        assert_eq!(parse(json!({"file": "/run/k"})).unwrap(), ApiKey::File("/run/k".into()));
        assert_eq!(parse(json!("passthrough")).unwrap(), ApiKey::Passthrough);
        assert!(parse(json!("plain-text-key")).is_err());
    }
}
