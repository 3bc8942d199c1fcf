//! The shared token that proves a caller is the gateway's own Envoy.
//!
//! ext-proc's gRPC port returns header mutations carrying backends' API keys,
//! the stream guard calls backends with them, and the admin port takes usage
//! records and spends rate limits. They listen on loopback, but anything on
//! the same host (or pod) can reach loopback. So where a token is configured,
//! every caller must present it: the filter sends it in
//! [`headers::INTERNAL_TOKEN`] to the guard and the admin port, and Envoy as
//! `initial_metadata` on the ext_proc gRPC stream. It is compared in constant
//! time (both sides hashed, so not even its length shows in the timing).
//! Without a token, the processes trust every caller, as before, and say so
//! in a warning at start.

use modelgate_proto::error::GatewayError;
use modelgate_proto::{headers, keys};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// What a process asks of its callers: the token's digest, or nothing.
#[derive(Clone, Default)]
pub struct InternalToken {
    digest: Option<[u8; 32]>,
}

/// The variable that may hold the token itself (kept off the command line,
/// where any local user could read it).
pub const TOKEN_VARIABLE: &str = "MODELGATE_INTERNAL_TOKEN";

/// The command-line option naming the token's file, shared by ext-proc and the stream guard.
#[derive(Debug, Clone, clap::Args)]
pub struct InternalTokenArgs {
    /// A file holding the token Envoy presents to this process (see the
    /// filter's `internal_token`); or the token itself in MODELGATE_INTERNAL_TOKEN.
    /// Without either, every caller is trusted.
    #[arg(long = "internal-token-file", env = "MODELGATE_INTERNAL_TOKEN_FILE", value_name = "FILE")]
    pub internal_token_file: Option<PathBuf>,
}

impl InternalTokenArgs {
    /// The token, from the file or the variable; `what` names the ports it guards, for the warning.
    pub fn load(&self, what: &str) -> Result<InternalToken, String> {
        Ok(InternalToken::from_secret(self.secret()?.as_deref(), what))
    }

    /// The token itself, for a process that presents it too (ext-proc's batch
    /// runner, calling Envoy's listener); none when none is configured.
    pub fn secret(&self) -> Result<Option<String>, String> {
        let secret = match &self.internal_token_file {
            Some(file) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| format!("internal token file {} cannot be read: {e}", file.display()))?,
            ),
            None => std::env::var(TOKEN_VARIABLE).ok(),
        };
        match secret.as_deref().map(str::trim) {
            Some("") => Err("the internal token is empty".into()),
            secret => Ok(secret.map(str::to_string)),
        }
    }
}

impl InternalToken {
    /// What to ask of callers given the configured `secret`, if any (without
    /// one, every caller is trusted, and a warning says so); `what` names the
    /// ports it guards. For a process that also presents the secret, read once.
    pub fn from_secret(secret: Option<&str>, what: &str) -> Self {
        match secret {
            Some(secret) => InternalToken::new(secret),
            None => {
                tracing::warn!(
                    "no internal token configured (--internal-token-file or {TOKEN_VARIABLE}): anything that can \
                     reach {what} is trusted as the gateway's Envoy"
                );
                InternalToken::default()
            }
        }
    }

    /// The token `secret`, which the caller has made sure is not empty.
    pub fn new(secret: &str) -> Self {
        InternalToken { digest: Some(Sha256::digest(secret.as_bytes()).into()) }
    }

    /// True when a caller presenting `presented` (the header's value, if it sent one) may be served.
    pub fn admits(&self, presented: Option<&[u8]>) -> bool {
        match (&self.digest, presented) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(digest), Some(presented)) => keys::matches_digest(digest, presented),
        }
    }

    /// Admits a caller presenting `presented`, or logs the refusal and returns the answer to it.
    pub fn check(&self, presented: Option<&[u8]>) -> Result<(), GatewayError> {
        if self.admits(presented) {
            return Ok(());
        }
        tracing::warn!("refused a caller without the gateway's internal token");
        Err(GatewayError::invalid_internal_token(headers::INTERNAL_TOKEN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_configured_token_is_admitted() {
        let token = InternalToken::new("s3cret-token");
        assert!(token.admits(Some(b"s3cret-token")));
        for wrong in [&b""[..], b"s3cret-toke", b"s3cret-token ", b"S3CRET-TOKEN", b"\xff"] {
            assert!(!token.admits(Some(wrong)), "{wrong:?}");
        }
        assert!(!token.admits(None));
        let refused = token.check(None).unwrap_err();
        assert_eq!((refused.status, refused.should_retry()), (401, Some(false)));
        assert!(refused.message.contains(headers::INTERNAL_TOKEN), "{}", refused.message);
    }

    #[test]
    fn without_a_token_every_caller_is_trusted() {
        let open = InternalToken::default();
        assert!(open.admits(None) && open.admits(Some(b"anything")));
    }

    #[test]
    fn the_token_comes_from_its_file_trimmed_and_an_empty_one_is_an_error() {
        let file = std::env::temp_dir().join(format!("modelgate-token-{}", std::process::id()));
        std::fs::write(&file, "tok-1\n").unwrap();
        let args = InternalTokenArgs { internal_token_file: Some(file.clone()) };
        assert!(args.load("test").unwrap().admits(Some(b"tok-1")));
        std::fs::write(&file, " \n").unwrap();
        assert!(args.load("test").is_err());
        std::fs::remove_file(&file).unwrap();
        assert!(args.load("test").is_err(), "a named file that is missing fails at start");
    }
}
