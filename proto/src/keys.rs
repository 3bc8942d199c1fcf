//! Client API keys: who may call the gateway, and which models each key may use.
//!
//! Keys are configured as SHA-256 digests, never in plain text, so the
//! configuration can be read (or leaked) without giving a key away. A
//! presented key is hashed and compared with every configured digest in
//! constant time, so an answer's timing says nothing about how close a guess
//! came. A key is known by its name in everything the gateway writes (logs,
//! metrics, usage); the key itself never appears.

use crate::config::ClientKeyConfig;
use crate::error::GatewayError;
use crate::limits::KeyLimits;
use crate::routing::Pattern;
use sha2::{Digest, Sha256};
use std::rc::Rc;
use subtle::ConstantTimeEq;

/// One configured client key.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientKey {
    /// What the gateway calls the key: in logs, metrics and usage reports.
    pub name: String,
    digest: [u8; 32],
    /// Model names or patterns the key may use; `None` for every model.
    models: Option<Vec<String>>,
    pub limits: KeyLimits,
    /// An operator's key: it may load and unload LoRA adapters.
    pub admin: bool,
}

impl ClientKey {
    /// A key allowed `models`, for tests that need one without hashing.
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str, models: &[&str]) -> Self {
        ClientKey {
            name: name.into(),
            digest: [0; 32],
            models: Some(models.iter().map(|m| m.to_string()).collect()),
            limits: KeyLimits::default(),
            admin: false,
        }
    }

    /// True when the key may use `model`.
    pub fn allows(&self, model: &str) -> bool {
        match &self.models {
            None => true,
            Some(patterns) => patterns.iter().any(|p| Pattern::parse(p).is_ok_and(|p| p.matches(model))),
        }
    }
}

/// The key a request came with: `None` where no keys are configured.
pub type Caller = Option<Rc<ClientKey>>;

/// True when `caller` may use `model`: any caller may, where no keys are configured.
pub fn may_use(caller: Option<&ClientKey>, model: &str) -> bool {
    caller.is_none_or(|key| key.allows(model))
}

/// Every configured client key. With none configured the gateway is open:
/// any caller may use any model, as before keys existed.
#[derive(Debug, Default)]
pub struct ClientKeys {
    keys: Vec<Rc<ClientKey>>,
}

impl ClientKeys {
    pub fn from_config(configs: &[ClientKeyConfig]) -> Result<Self, String> {
        let mut keys = Vec::with_capacity(configs.len());
        for config in configs {
            if !is_header_value(&config.name) {
                return Err(format!(
                    "client key name `{}` must be printable ASCII, not empty, without spaces at either end: \
                     it is sent in headers (the owner of files and batches)",
                    config.name.escape_debug()
                ));
            }
            let digest = parse_digest(&config.sha256)
                .ok_or_else(|| format!("client key `{}`: sha256 must be 64 hex digits", config.name))?;
            if keys.iter().any(|k: &Rc<ClientKey>| k.name == config.name) {
                return Err(format!("client key name `{}` is configured twice", config.name));
            }
            if keys.iter().any(|k: &Rc<ClientKey>| k.digest == digest) {
                return Err(format!("client key `{}` has the same sha256 as another key", config.name));
            }
            for pattern in config.models.iter().flatten() {
                Pattern::parse(pattern).map_err(|e| format!("client key `{}`: {e}", config.name))?;
            }
            let limits = match &config.limits {
                Some(limits) => {
                    KeyLimits::from_config(limits).map_err(|e| format!("client key `{}`: {e}", config.name))?
                }
                None => KeyLimits::default(),
            };
            keys.push(Rc::new(ClientKey {
                name: config.name.clone(),
                digest,
                models: config.models.clone(),
                limits,
                admin: config.admin,
            }));
        }
        Ok(ClientKeys { keys })
    }

    /// True when callers must present a key.
    pub fn required(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The key a caller presented, from its `authorization: Bearer` or
    /// `api-key` header. `Ok(None)` when no keys are configured.
    pub fn authenticate(&self, presented: Presented<'_>) -> Result<Caller, GatewayError> {
        if !self.required() {
            return Ok(None);
        }
        let key = presented.key().ok_or_else(GatewayError::missing_api_key)?;
        let digest: [u8; 32] = Sha256::digest(key).into();
        // Every digest is compared, whichever matches: the time taken does not depend on which.
        let mut found = None;
        for candidate in &self.keys {
            if bool::from(candidate.digest.ct_eq(&digest)) {
                found = Some(Rc::clone(candidate));
            }
        }
        found.map(Some).ok_or_else(GatewayError::invalid_api_key)
    }

    /// The key named `name`, for a request the gateway makes on its behalf
    /// (a batch's line): `Ok(None)` when no keys are configured.
    pub fn on_behalf_of(&self, name: &[u8]) -> Result<Caller, GatewayError> {
        if !self.required() {
            return Ok(None);
        }
        let found = self.keys.iter().find(|key| key.name.as_bytes() == name);
        found.map(|key| Some(Rc::clone(key))).ok_or_else(GatewayError::invalid_api_key)
    }
}

/// True when `presented` is the configured internal `token`. Compared as
/// SHA-256 digests in constant time, as keys are, so an answer's timing says
/// nothing of how close a guess came, nor of the token's length.
pub fn is_internal_token(token: &str, presented: &[u8]) -> bool {
    matches_digest(&Sha256::digest(token.as_bytes()).into(), presented)
}

/// True when `presented` hashes to `expected` (a secret's SHA-256), compared
/// in constant time: the one comparison of the internal token, here and in
/// the processes beside Envoy, which keep only the digest.
pub fn matches_digest(expected: &[u8; 32], presented: &[u8]) -> bool {
    let presented: [u8; 32] = Sha256::digest(presented).into();
    bool::from(expected.ct_eq(&presented))
}

/// True for a value a header carries as it is: printable ASCII, not empty,
/// with no space at either end (HTTP trims those).
fn is_header_value(value: &str) -> bool {
    !value.is_empty() && value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) && value.trim() == value
}

/// The headers a client's key can come in.
#[derive(Debug, Default, Clone, Copy)]
pub struct Presented<'a> {
    pub authorization: Option<&'a [u8]>,
    /// `api-key` (Azure OpenAI's SDKs), or `x-api-key` (Anthropic's).
    pub api_key: Option<&'a [u8]>,
}

impl<'a> Presented<'a> {
    /// The key itself: a bearer token, else the `api-key` header (Azure OpenAI's way).
    fn key(&self) -> Option<&'a [u8]> {
        let bearer = self.authorization.and_then(|value| {
            let value = value.trim_ascii();
            let (scheme, token) = value.split_at(value.iter().position(|&b| b == b' ')?);
            scheme.eq_ignore_ascii_case(b"bearer").then(|| token.trim_ascii())
        });
        bearer.or(self.api_key.map(<[u8]>::trim_ascii)).filter(|key| !key.is_empty())
    }
}

fn parse_digest(hex_digits: &str) -> Option<[u8; 32]> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut digest).ok()?;
    Some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use proptest::prelude::*;

    fn digest_of(key: &str) -> String {
        hex::encode(Sha256::digest(key.as_bytes()))
    }

    fn keys() -> ClientKeys {
        let configs: Vec<ClientKeyConfig> = serde_json::from_value(serde_json::json!([
            {"name": "alpha", "sha256": digest_of("sk-alpha")},
            {"name": "beta", "sha256": digest_of("sk-beta").to_uppercase(), "models": ["llama-*", "gpt-4o"]},
        ]))
        .unwrap();
        ClientKeys::from_config(&configs).unwrap()
    }

    fn bearer(value: &str) -> Presented<'_> {
        Presented { authorization: Some(value.as_bytes()), api_key: None }
    }

    fn name(result: Result<Caller, GatewayError>) -> String {
        result.unwrap().unwrap().name.clone()
    }

    #[test]
    fn a_configured_key_is_recognised_by_its_hash() {
        let keys = keys();
        assert_eq!(name(keys.authenticate(bearer("Bearer sk-alpha"))), "alpha");
        assert_eq!(name(keys.authenticate(bearer("bearer   sk-beta "))), "beta");
        let azure = Presented { authorization: None, api_key: Some(b"sk-beta") };
        assert_eq!(name(keys.authenticate(azure)), "beta");
    }

    #[test]
    fn a_missing_or_wrong_key_is_a_401_that_names_no_key() {
        let keys = keys();
        for presented in [
            Presented::default(),
            bearer("Bearer "),
            bearer("Basic c2stYWxwaGE="),
            bearer("sk-alpha"),
            Presented { authorization: None, api_key: Some(b"  ") },
        ] {
            let e = keys.authenticate(presented).unwrap_err();
            assert_eq!((e.status, e.code), (401, Some(ErrorCode::InvalidApiKey)));
            assert!(e.message.starts_with("You didn't provide an API key"), "{}", e.message);
        }
        let e = keys.authenticate(bearer("Bearer sk-alphx")).unwrap_err();
        assert_eq!((e.status, e.code), (401, Some(ErrorCode::InvalidApiKey)));
        assert!(!e.message.contains("sk-"), "{}", e.message);
    }

    #[test]
    fn without_keys_the_gateway_is_open() {
        let open = ClientKeys::default();
        assert!(!open.required());
        assert_eq!(open.authenticate(Presented::default()).unwrap(), None);
    }

    #[test]
    fn a_key_may_use_only_its_models() {
        let keys = keys();
        let alpha = keys.authenticate(bearer("Bearer sk-alpha")).unwrap().unwrap();
        let beta = keys.authenticate(bearer("Bearer sk-beta")).unwrap().unwrap();
        assert!(alpha.allows("anything"));
        assert!(beta.allows("llama-3") && beta.allows("gpt-4o"));
        assert!(!beta.allows("gpt-4o-mini") && !beta.allows("claude"));
    }

    #[test]
    fn bad_key_configurations_are_refused() {
        let config = |v: serde_json::Value| -> Vec<ClientKeyConfig> { serde_json::from_value(v).unwrap() };
        let hash = digest_of("k");
        for (bad, why) in [
            (serde_json::json!([{"name": "a", "sha256": "sk-plain-text-key"}]), "64 hex digits"),
            (serde_json::json!([{"name": "a", "sha256": &hash[..62]}]), "64 hex digits"),
            (serde_json::json!([{"name": "a", "sha256": hash}, {"name": "a", "sha256": digest_of("j")}]), "twice"),
            (serde_json::json!([{"name": "a", "sha256": hash}, {"name": "b", "sha256": hash}]), "same sha256"),
            (serde_json::json!([{"name": "a", "sha256": hash, "models": ["a*b"]}]), "only at the end"),
            (serde_json::json!([{"name": "", "sha256": hash}]), "printable ASCII"),
            (serde_json::json!([{"name": "line\nbreak", "sha256": hash}]), "printable ASCII"),
            (serde_json::json!([{"name": " padded", "sha256": hash}]), "printable ASCII"),
            (serde_json::json!([{"name": "caf\u{e9}", "sha256": hash}]), "printable ASCII"),
        ] {
            let e = ClientKeys::from_config(&config(bad)).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn a_request_on_behalf_of_a_key_is_that_keys_by_name() {
        let keys = keys();
        assert_eq!(name(keys.on_behalf_of(b"beta")), "beta");
        let e = keys.on_behalf_of(b"gamma").unwrap_err();
        assert_eq!((e.status, e.code), (401, Some(ErrorCode::InvalidApiKey)));
        assert_eq!(keys.on_behalf_of(b"").unwrap_err().status, 401);
        assert_eq!(ClientKeys::default().on_behalf_of(b"anyone").unwrap(), None, "an open gateway");
        let spaced = config_with_name("team a");
        assert_eq!(name(ClientKeys::from_config(&spaced).unwrap().on_behalf_of(b"team a")), "team a");
    }

    fn config_with_name(name: &str) -> Vec<ClientKeyConfig> {
        serde_json::from_value(serde_json::json!([{"name": name, "sha256": digest_of("k")}])).unwrap()
    }

    #[test]
    fn only_the_internal_token_itself_matches() {
        assert!(is_internal_token("s3cret-token", b"s3cret-token"));
        for wrong in [&b""[..], b"s3cret-toke", b"s3cret-token ", b"S3CRET-TOKEN", b"\xff"] {
            assert!(!is_internal_token("s3cret-token", wrong), "{wrong:?}");
        }
    }

    proptest! {
        #[test]
        fn any_header_value_a_name_allows_is_accepted_and_no_other(name in "\\PC{0,12}") {
            let accepted = ClientKeys::from_config(&config_with_name(&name)).is_ok();
            let fits = !name.is_empty() && name.trim() == name && name.bytes().all(|b| (0x20..0x7f).contains(&b));
            prop_assert_eq!(accepted, fits);
        }

        #[test]
        fn only_a_configured_name_or_the_token_itself_is_taken(presented in proptest::collection::vec(any::<u8>(), 0..40)) {
            let keys = keys();
            let named = keys.on_behalf_of(&presented).ok().flatten().map(|key| key.name.clone());
            let expected = ["alpha", "beta"].into_iter().find(|name| name.as_bytes() == presented.as_slice());
            prop_assert_eq!(named.as_deref(), expected);
            prop_assert_eq!(is_internal_token("tok-1", &presented), presented == b"tok-1");
        }

        #[test]
        fn arbitrary_header_bytes_never_panic(authorization in proptest::collection::vec(any::<u8>(), 0..80),
                                              api_key in proptest::collection::vec(any::<u8>(), 0..80)) {
            let presented = Presented { authorization: Some(&authorization), api_key: Some(&api_key) };
            let _ = keys().authenticate(presented);
        }
    }
}
