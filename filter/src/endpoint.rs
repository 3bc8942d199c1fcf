//! Which OpenAI endpoint a request is for, from its method and path.

/// Paths whose POST body names the model that picks the backend.
const MODEL_ROUTED_PATHS: &[&str] = &["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];
const MODELS_PATH: &str = "/v1/models";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// POST with a JSON body whose `model` picks the backend.
    ModelRouted,
    /// GET /v1/models
    ListModels,
    /// GET /v1/models/{id}, the id percent-decoded (ids such as `Qwen/Qwen2.5-7B` hold slashes).
    RetrieveModel(String),
    /// A known path called with a method it does not take; carries the allowed one.
    WrongMethod(&'static str),
    /// Anything else: left to Envoy's routes.
    Other,
}

pub fn classify(method: &str, path: &str) -> Endpoint {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if MODEL_ROUTED_PATHS.contains(&path) {
        return if method == "POST" { Endpoint::ModelRouted } else { Endpoint::WrongMethod("POST") };
    }
    let model_id = if path == MODELS_PATH {
        None
    } else if let Some(id) = path.strip_prefix(MODELS_PATH).and_then(|rest| rest.strip_prefix('/')) {
        Some(id)
    } else {
        return Endpoint::Other;
    };
    if method != "GET" {
        return Endpoint::WrongMethod("GET");
    }
    match model_id {
        None => Endpoint::ListModels,
        Some(id) => Endpoint::RetrieveModel(percent_encoding::percent_decode_str(id).decode_utf8_lossy().into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_paths_and_methods() {
        assert_eq!(classify("POST", "/v1/chat/completions"), Endpoint::ModelRouted);
        assert_eq!(classify("POST", "/v1/completions?x=1"), Endpoint::ModelRouted);
        assert_eq!(classify("POST", "/v1/embeddings"), Endpoint::ModelRouted);
        assert_eq!(classify("GET", "/v1/chat/completions"), Endpoint::WrongMethod("POST"));
        assert_eq!(classify("GET", "/v1/models"), Endpoint::ListModels);
        assert_eq!(classify("DELETE", "/v1/models"), Endpoint::WrongMethod("GET"));
        assert_eq!(classify("GET", "/v1/models/Qwen%2FQwen2.5-7B"), Endpoint::RetrieveModel("Qwen/Qwen2.5-7B".into()));
        assert_eq!(classify("GET", "/v1/models/org/name"), Endpoint::RetrieveModel("org/name".into()));
        assert_eq!(classify("GET", "/v1/modelsx"), Endpoint::Other);
        assert_eq!(classify("GET", "/health"), Endpoint::Other);
        assert_eq!(classify("POST", "/v1/chat/completions/extra"), Endpoint::Other);
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
