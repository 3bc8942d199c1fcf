//! The API key a backend is called with: from ext-proc's environment, from a
//! file (a mounted secret, read on every request so a rotated key takes
//! effect at once), or the client's own.
//! Keys never appear in logs or error messages; only where they come from does.

use modelgate_proto::backend::ApiKey;
use modelgate_proto::error::GatewayError;

/// The key for a backend whose profile says `source`; `client_key` is the
/// value of the client's `authorization`, `api-key` or `x-api-key` header.
pub fn resolve(source: &ApiKey, client_key: Option<&[u8]>) -> Result<Option<String>, GatewayError> {
    match source {
        ApiKey::Env(name) => match std::env::var(name) {
            Ok(key) if !key.trim().is_empty() => Ok(Some(key.trim().to_string())),
            _ => Err(missing(&format!("environment variable {name} is not set"))),
        },
        ApiKey::File(path) => match std::fs::read_to_string(path) {
            Ok(key) if !key.trim().is_empty() => Ok(Some(key.trim().to_string())),
            Ok(_) => Err(missing(&format!("{path} is empty"))),
            Err(e) => Err(missing(&format!("{path} cannot be read: {e}"))),
        },
        ApiKey::Passthrough => Ok(client_key.map(|value| {
            let value = String::from_utf8_lossy(value);
            let value = value.trim();
            value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).unwrap_or(value).to_string()
        })),
    }
}

fn missing(why: &str) -> GatewayError {
    tracing::error!("backend API key unavailable: {why}");
    GatewayError::new(
        500,
        "server_error",
        "The gateway has no API key for this model's backend; its operators have been told why.".into(),
        None,
        Some("backend_key_unavailable"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_files_or_the_client() {
        let dir = std::env::temp_dir().join(format!("modelgate-key-{}", std::process::id()));
        std::fs::write(&dir, "sk-file\n").unwrap();
        assert_eq!(resolve(&ApiKey::File(dir.display().to_string()), None).unwrap().as_deref(), Some("sk-file"));
        std::fs::remove_file(&dir).unwrap();
        let gone = resolve(&ApiKey::File(dir.display().to_string()), None).unwrap_err();
        assert_eq!((gone.status, gone.body.code.as_deref()), (500, Some("backend_key_unavailable")));
        assert!(!gone.body.message.contains(&dir.display().to_string()), "paths stay out of client messages");

        assert_eq!(resolve(&ApiKey::Passthrough, Some(b"Bearer sk-client")).unwrap().as_deref(), Some("sk-client"));
        assert_eq!(resolve(&ApiKey::Passthrough, Some(b"sk-raw")).unwrap().as_deref(), Some("sk-raw"));
        assert_eq!(resolve(&ApiKey::Passthrough, None).unwrap(), None);
        assert!(resolve(&ApiKey::Env("MODELGATE_SURELY_UNSET_VARIABLE".into()), None).is_err());
    }
}
