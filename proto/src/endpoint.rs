//! The OpenAI endpoints the gateway knows: their paths and methods, which of
//! them a request body's `model` routes, and what a request's method and path
//! ask for. The filter classifies requests with it; the dialects translate by it.

/// An OpenAI endpoint the gateway serves. Adding one: a variant, its path and
/// method below; model-routed endpoints are then routed by the filter, and each
/// dialect answers it or refuses it as unsupported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    /// `/v1/models`, and `/v1/models/{id}` for one model; answered by the filter from configuration.
    Models,
    /// The Files API: `/v1/files` and every path under it, any method;
    /// answered by ext-proc's batch service.
    Files,
    /// The Batch API: `/v1/batches` and every path under it, any method;
    /// answered by ext-proc's batch service.
    Batches,
    /// vLLM's `/tokenize` (served at the root): a prompt's token ids, routed by `model`.
    Tokenize,
    /// vLLM's `/detokenize`: token ids back to text, routed by `model`.
    Detokenize,
    /// vLLM's `/v1/load_lora_adapter`, for a self-hosted pool: an admin's
    /// operation, answered by ext-proc, which fans it out to the pool's replicas.
    LoadLoraAdapter,
    /// vLLM's `/v1/unload_lora_adapter`, as [`Endpoint::LoadLoraAdapter`].
    UnloadLoraAdapter,
    /// OpenAI's Responses API, `POST /v1/responses`, routed by `model`. The
    /// responses the gateway stored, `/v1/responses/{id}…`, are answered by
    /// ext-proc's batch service beside files and batches.
    Responses,
    /// Anthropic's Messages API, `POST /v1/messages`, routed by `model`.
    Messages,
    /// Anthropic's `POST /v1/messages/count_tokens`, routed by `model`.
    CountTokens,
}

impl Endpoint {
    pub const ALL: [Endpoint; 13] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Models,
        Endpoint::Files,
        Endpoint::Batches,
        Endpoint::Tokenize,
        Endpoint::Detokenize,
        Endpoint::LoadLoraAdapter,
        Endpoint::UnloadLoraAdapter,
        Endpoint::Responses,
        Endpoint::Messages,
        Endpoint::CountTokens,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Models => "/v1/models",
            Endpoint::Files => "/v1/files",
            Endpoint::Batches => "/v1/batches",
            Endpoint::Tokenize => "/tokenize",
            Endpoint::Detokenize => "/detokenize",
            Endpoint::LoadLoraAdapter => "/v1/load_lora_adapter",
            Endpoint::UnloadLoraAdapter => "/v1/unload_lora_adapter",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Messages => "/v1/messages",
            Endpoint::CountTokens => "/v1/messages/count_tokens",
        }
    }

    /// Whether a request's JSON body names the `model` that picks its backend.
    pub fn is_model_routed(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions
                | Endpoint::Completions
                | Endpoint::Embeddings
                | Endpoint::Tokenize
                | Endpoint::Detokenize
                | Endpoint::Responses
                | Endpoint::Messages
                | Endpoint::CountTokens
        )
    }

    /// Whether the endpoint is an operation on a self-hosted pool, answered by
    /// ext-proc's pools service and only for an admin key.
    pub fn is_pool_operation(self) -> bool {
        matches!(self, Endpoint::LoadLoraAdapter | Endpoint::UnloadLoraAdapter)
    }

    /// Whether a model's answer on this endpoint is a completion whose usage
    /// counts (tokenizing one is not).
    pub fn is_completion(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions
                | Endpoint::Completions
                | Endpoint::Embeddings
                | Endpoint::Responses
                | Endpoint::Messages
        )
    }

    /// Whether the endpoint is answered by ext-proc's batch service, whose
    /// paths take several methods (it answers a wrong one itself).
    pub fn is_batch_service(self) -> bool {
        matches!(self, Endpoint::Files | Endpoint::Batches)
    }

    /// The one method the endpoint takes: POST with a JSON body, or GET;
    /// `None` for the batch service's, which take several.
    pub fn method(self) -> Option<&'static str> {
        match self {
            Endpoint::ChatCompletions
            | Endpoint::Completions
            | Endpoint::Embeddings
            | Endpoint::Tokenize
            | Endpoint::Detokenize
            | Endpoint::LoadLoraAdapter
            | Endpoint::UnloadLoraAdapter
            | Endpoint::Responses
            | Endpoint::Messages
            | Endpoint::CountTokens => Some("POST"),
            Endpoint::Models => Some("GET"),
            Endpoint::Files | Endpoint::Batches => None,
        }
    }

    /// The endpoint whose path is exactly `path` (a query string is ignored).
    pub fn from_path(path: &[u8]) -> Option<Self> {
        let path = path.split(|&b| b == b'?').next().unwrap_or_default();
        Self::ALL.into_iter().find(|endpoint| endpoint.path().as_bytes() == path)
    }
}

/// What a request's method and path ask of the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A POST whose JSON body's `model` picks the backend.
    ModelRouted(Endpoint),
    /// GET /v1/models
    ListModels,
    /// GET /v1/models/{id}, the id percent-decoded (ids such as `Qwen/Qwen2.5-7B` hold slashes).
    RetrieveModel(String),
    /// `/v1/files…` or `/v1/batches…` ([`Endpoint::is_batch_service`]), or the
    /// stored responses `/v1/responses/…` ([`Endpoint::Responses`]), any method.
    BatchService(Endpoint),
    /// A POST of an operation on a self-hosted pool ([`Endpoint::is_pool_operation`]).
    PoolOperation(Endpoint),
    /// A known path called with a method it does not take; carries the allowed one.
    WrongMethod(&'static str),
    /// Anything else: left to Envoy's routes.
    Other,
}

pub fn classify(method: &str, path: &str) -> Target {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let under = |base: &str| path.strip_prefix(base).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    if let Some(service) = Endpoint::ALL.into_iter().find(|e| e.is_batch_service() && under(e.path())) {
        return Target::BatchService(service);
    }
    // The stored responses, any method; `POST /v1/responses` itself is model-routed.
    if path.strip_prefix(Endpoint::Responses.path()).is_some_and(|rest| rest.starts_with('/')) {
        return Target::BatchService(Endpoint::Responses);
    }
    let models = Endpoint::Models.path();
    let (endpoint, model_id) = match Endpoint::from_path(path.as_bytes()) {
        Some(endpoint) => (endpoint, None),
        None => match path.strip_prefix(models).and_then(|rest| rest.strip_prefix('/')) {
            Some(id) => (Endpoint::Models, Some(id)),
            None => return Target::Other,
        },
    };
    match endpoint.method() {
        Some(allowed) if method != allowed => return Target::WrongMethod(allowed),
        _ => {}
    }
    match (endpoint, model_id) {
        (Endpoint::Models, None) => Target::ListModels,
        (Endpoint::Models, Some(id)) => {
            Target::RetrieveModel(percent_encoding::percent_decode_str(id).decode_utf8_lossy().into_owned())
        }
        (endpoint, _) if endpoint.is_pool_operation() => Target::PoolOperation(endpoint),
        (endpoint, _) => Target::ModelRouted(endpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_paths_and_methods() {
        assert_eq!(classify("POST", "/v1/chat/completions"), Target::ModelRouted(Endpoint::ChatCompletions));
        assert_eq!(classify("POST", "/v1/completions?x=1"), Target::ModelRouted(Endpoint::Completions));
        assert_eq!(classify("POST", "/v1/embeddings"), Target::ModelRouted(Endpoint::Embeddings));
        assert_eq!(classify("GET", "/v1/chat/completions"), Target::WrongMethod("POST"));
        assert_eq!(classify("GET", "/v1/models"), Target::ListModels);
        assert_eq!(classify("DELETE", "/v1/models"), Target::WrongMethod("GET"));
        assert_eq!(classify("GET", "/v1/models/Qwen%2FQwen2.5-7B"), Target::RetrieveModel("Qwen/Qwen2.5-7B".into()));
        assert_eq!(classify("GET", "/v1/models/org/name"), Target::RetrieveModel("org/name".into()));
        assert_eq!(classify("GET", "/v1/modelsx"), Target::Other);
        assert_eq!(classify("GET", "/health"), Target::Other);
        assert_eq!(classify("POST", "/v1/chat/completions/extra"), Target::Other);
    }

    #[test]
    fn vllms_operational_endpoints() {
        assert_eq!(classify("POST", "/tokenize"), Target::ModelRouted(Endpoint::Tokenize));
        assert_eq!(classify("POST", "/detokenize"), Target::ModelRouted(Endpoint::Detokenize));
        assert_eq!(classify("GET", "/tokenize"), Target::WrongMethod("POST"));
        assert_eq!(classify("POST", "/v1/tokenize"), Target::Other);
        assert_eq!(classify("POST", "/v1/load_lora_adapter"), Target::PoolOperation(Endpoint::LoadLoraAdapter));
        assert_eq!(classify("POST", "/v1/unload_lora_adapter?x=1"), Target::PoolOperation(Endpoint::UnloadLoraAdapter));
        assert_eq!(classify("GET", "/v1/load_lora_adapter"), Target::WrongMethod("POST"));
        assert!(!Endpoint::Tokenize.is_completion() && Endpoint::Embeddings.is_completion());
    }

    #[test]
    fn the_files_and_batch_apis_are_every_path_under_theirs_with_any_method() {
        let files = Target::BatchService(Endpoint::Files);
        let batches = Target::BatchService(Endpoint::Batches);
        for method in ["GET", "POST", "DELETE", "PUT"] {
            assert_eq!(classify(method, "/v1/files"), files);
            assert_eq!(classify(method, "/v1/files?purpose=batch&limit=2"), files);
            assert_eq!(classify(method, "/v1/files/file-abc/content"), files);
            assert_eq!(classify(method, "/v1/batches"), batches);
            assert_eq!(classify(method, "/v1/batches/batch_abc/cancel"), batches);
        }
        assert_eq!(classify("GET", "/v1/filesystem"), Target::Other);
        assert_eq!(classify("POST", "/v1/batchesx"), Target::Other);
        assert_eq!(classify("GET", "/v2/files"), Target::Other);
    }

    #[test]
    fn the_responses_and_messages_apis_are_routed_by_model_and_stored_responses_go_to_the_batch_service() {
        assert_eq!(classify("POST", "/v1/responses"), Target::ModelRouted(Endpoint::Responses));
        assert_eq!(classify("GET", "/v1/responses"), Target::WrongMethod("POST"));
        assert_eq!(classify("POST", "/v1/messages"), Target::ModelRouted(Endpoint::Messages));
        assert_eq!(classify("POST", "/v1/messages/count_tokens"), Target::ModelRouted(Endpoint::CountTokens));
        assert_eq!(classify("GET", "/v1/messages"), Target::WrongMethod("POST"));
        let stored = Target::BatchService(Endpoint::Responses);
        for method in ["GET", "DELETE", "POST"] {
            assert_eq!(classify(method, "/v1/responses/resp_1"), stored);
            assert_eq!(classify(method, "/v1/responses/resp_1/input_items?limit=2"), stored);
        }
        assert_eq!(classify("POST", "/v1/responsesx"), Target::Other);
        assert_eq!(classify("POST", "/v1/messages/batches"), Target::Other);
        assert!(Endpoint::Responses.is_completion() && Endpoint::Messages.is_completion());
        assert!(!Endpoint::CountTokens.is_completion() && Endpoint::CountTokens.is_model_routed());
    }

    #[test]
    fn every_endpoint_is_found_by_its_path() {
        for endpoint in Endpoint::ALL {
            assert_eq!(Endpoint::from_path(endpoint.path().as_bytes()), Some(endpoint));
        }
        assert_eq!(Endpoint::from_path(b"/v1/embeddings?x=1"), Some(Endpoint::Embeddings));
        assert_eq!(Endpoint::from_path(b"/v1/models/x"), None);
    }

    proptest! {
        #[test]
        fn any_method_and_path_is_classified_without_panic(method in ".{0,8}", path in "\\PC{0,64}") {
            let _ = classify(&method, &path);
        }

        #[test]
        fn invalid_percent_escapes_decode_lossily(id in "[%a-zA-Z0-9]{0,16}") {
            let _ = classify("GET", &format!("/v1/models/{id}"));
        }
    }
}
