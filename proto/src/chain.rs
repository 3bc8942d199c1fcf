//! A model's fallback chain, as the filter hands it to ext_proc: each
//! backend's profile by backend name. Envoy picks the backend of each attempt
//! (a priority of the chain cluster, whose endpoints name their backend in
//! metadata); ext_proc looks up that backend's profile here.

use crate::backend::BackendProfile;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Backend name to profile; `None` for a backend whose requests pass untouched.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Chain(pub BTreeMap<String, Option<BackendProfile>>);

impl Chain {
    /// The chain as the value of the internal header.
    pub fn to_header(&self) -> String {
        // Strings and JSON values always serialise.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_header(value: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(value)
    }

    /// The profile for an attempt at `backend`: `Ok(None)` when it passes
    /// untouched, `Err` when the backend is not in the chain (a chain
    /// cluster whose endpoints name a backend the route does not list).
    pub fn profile(&self, backend: &str) -> Result<Option<&BackendProfile>, String> {
        match self.0.get(backend) {
            Some(profile) => Ok(profile.as_ref()),
            None => Err(format!("backend `{backend}` is not in the model's chain")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Dialect;

    #[test]
    fn a_chain_round_trips_through_its_header_and_names_each_backends_profile() {
        let anthropic =
            BackendProfile { dialect: Dialect::Anthropic, model: Some("claude".into()), ..Default::default() };
        let chain =
            Chain(BTreeMap::from([("pool".to_string(), None), ("anthropic".to_string(), Some(anthropic.clone()))]));
        let header = chain.to_header();
        assert_eq!(header, r#"{"anthropic":{"dialect":"anthropic","model":"claude"},"pool":null}"#);
        let read = Chain::from_header(header.as_bytes()).unwrap();
        assert_eq!(read.profile("pool"), Ok(None));
        assert_eq!(read.profile("anthropic"), Ok(Some(&anthropic)));
        assert!(read.profile("other").is_err());
    }
}
