//! The API key a backend is called with: from the process's environment, from
//! a file (a mounted secret, read again once its last read is a second old, so
//! a rotated key takes effect within a second), or the client's own.
//!
//! Where a key comes from arrives with each request, in the backend profile
//! the filter sets, and anyone who can reach ext-proc or the stream guard can
//! send a profile of their own. So a source is read only when the process's
//! own configuration allows it ([`KeySources`]: the variables and directories
//! named at its start); anything else is refused as an unavailable key.
//! Keys never appear in logs or error messages; only where they come from does.

use modelgate_proto::backend::ApiKey;
use modelgate_proto::clock;
use modelgate_proto::error::GatewayError;
use modelgate_proto::lru::Lru;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How long a key file's contents serve before the file is read again. Within
/// it a request costs no file read: nine system calls, with the path's
/// resolution, of the twenty-five ext-proc makes for a translated request.
pub const KEY_FILE_FRESH: Duration = Duration::from_secs(1);

/// The most memory key files are remembered in: a path is client-shaped (a
/// profile sent to ext-proc), and one file has many spellings.
const MOST_KEY_FILE_BYTES: usize = 32 * 1024;

/// The key sources this process may read, from its command line.
#[derive(Debug, Default, Clone)]
pub struct KeySources {
    /// Environment variables that hold backend keys.
    env: Vec<String>,
    /// Directories of key files, canonical: a file is read only when its own
    /// canonical path (`..` and symlinks resolved) lies inside one of them.
    dirs: Vec<PathBuf>,
    /// Key files lately read, by the path a profile named.
    read: ReadKeyFiles,
}

/// Key files' contents, each until it is `fresh_for` old; never printed.
#[derive(Default, Clone)]
struct ReadKeyFiles {
    fresh_for: Duration,
    files: Arc<Mutex<Lru<String>>>,
}

impl std::fmt::Debug for ReadKeyFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadKeyFiles(fresh for {:?})", self.fresh_for)
    }
}

impl ReadKeyFiles {
    fn new(fresh_for: Duration) -> Self {
        ReadKeyFiles { fresh_for, files: Arc::new(Mutex::new(Lru::new(MOST_KEY_FILE_BYTES))) }
    }

    /// The key last read from `path`, if that was within `fresh_for`.
    fn fresh(&self, path: &str) -> Option<String> {
        self.files.lock().unwrap_or_else(PoisonError::into_inner).get(path, clock::unix_millis()).cloned()
    }

    fn keep(&self, path: &str, key: &str) {
        let expires_ms = clock::unix_millis().saturating_add(self.fresh_for.as_millis() as u64);
        self.files.lock().unwrap_or_else(PoisonError::into_inner).put(path, key.to_string(), expires_ms);
    }
}

/// The command-line options naming the allowed key sources, shared by ext-proc and the stream guard.
#[derive(Debug, Clone, clap::Args)]
pub struct KeySourceArgs {
    /// An environment variable that may hold a backend's API key (a profile's
    /// `{"env": NAME}`); repeatable, or comma-separated in the variable.
    #[arg(long = "key-env", env = "MODELGATE_KEY_ENV", value_delimiter = ',', value_name = "NAME")]
    pub key_env: Vec<String>,
    /// A directory whose files may hold backends' API keys (a profile's
    /// `{"file": PATH}`); repeatable, or comma-separated in the variable.
    #[arg(long = "key-dir", env = "MODELGATE_KEY_DIR", value_delimiter = ',', value_name = "DIR")]
    pub key_dir: Vec<PathBuf>,
}

impl KeySourceArgs {
    /// The allowed sources; a directory that does not exist is an error, so a typo fails at start.
    pub fn sources(&self) -> Result<KeySources, String> {
        let sources = KeySources::new(self.key_env.clone(), &self.key_dir)?;
        tracing::info!(env = ?sources.env, dirs = ?sources.dirs, "backend API keys may come from these sources only");
        Ok(sources)
    }
}

impl KeySources {
    pub fn new(env: Vec<String>, dirs: &[PathBuf]) -> Result<Self, String> {
        Self::with_key_files_fresh_for(env, dirs, KEY_FILE_FRESH)
    }

    /// The same, a key file read again once its contents are `fresh_for` old.
    pub fn with_key_files_fresh_for(env: Vec<String>, dirs: &[PathBuf], fresh_for: Duration) -> Result<Self, String> {
        let dirs = dirs
            .iter()
            .map(|dir| {
                std::fs::canonicalize(dir).map_err(|e| format!("key directory {} cannot be used: {e}", dir.display()))
            })
            .collect::<Result<_, _>>()?;
        Ok(KeySources {
            env: env.into_iter().filter(|name| !name.is_empty()).collect(),
            dirs,
            read: ReadKeyFiles::new(fresh_for),
        })
    }

    /// The key for a backend whose profile says `source`; `client_key` is the
    /// value of the client's `authorization`, `api-key` or `x-api-key` header.
    pub fn resolve(&self, source: &ApiKey, client_key: Option<&[u8]>) -> Result<Option<String>, GatewayError> {
        match source {
            ApiKey::Env(name) => {
                if !self.env.contains(name) {
                    return Err(not_allowed(&format!("environment variable {}", bounded(name)), "--key-env"));
                }
                match std::env::var(name) {
                    Ok(key) if !key.trim().is_empty() => Ok(Some(key.trim().to_string())),
                    _ => Err(log_key_unavailable(&format!("environment variable {name} is not set"))),
                }
            }
            ApiKey::File(path) => {
                if let Some(key) = self.read.fresh(path) {
                    return Ok(Some(key));
                }
                let file = self.allowed_file(Path::new(path))?;
                match std::fs::read_to_string(&file) {
                    Ok(key) if !key.trim().is_empty() => {
                        self.read.keep(path, key.trim());
                        Ok(Some(key.trim().to_string()))
                    }
                    Ok(_) => Err(log_key_unavailable(&format!("{path} is empty"))),
                    Err(e) => Err(log_key_unavailable(&format!("{path} cannot be read: {e}"))),
                }
            }
            ApiKey::Passthrough => Ok(client_key.map(|value| {
                let value = String::from_utf8_lossy(value);
                let value = value.trim();
                value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).unwrap_or(value).to_string()
            })),
        }
    }

    /// The file's canonical path, when it lies inside an allowed directory.
    fn allowed_file(&self, path: &Path) -> Result<PathBuf, GatewayError> {
        let refused = || not_allowed(&format!("file {}", bounded(&path.to_string_lossy())), "--key-dir");
        if self.dirs.is_empty() {
            return Err(refused());
        }
        match std::fs::canonicalize(path) {
            Ok(file) if self.dirs.iter().any(|dir| file.starts_with(dir)) => Ok(file),
            Ok(_) => Err(refused()),
            // A missing key file where keys may be is the operator's to fix: say why.
            Err(e) if self.dirs.iter().any(|dir| path.starts_with(dir)) => {
                Err(log_key_unavailable(&format!("{} cannot be read: {e}", path.display())))
            }
            Err(_) => Err(refused()),
        }
    }
}

/// A source named by a request, shortened for the log: it may be anything a caller sent.
fn bounded(source: &str) -> String {
    const MOST: usize = 200;
    match source.char_indices().nth(MOST) {
        Some((end, _)) => format!("{}...", &source[..end]),
        None => source.to_string(),
    }
}

fn not_allowed(source: &str, option: &str) -> GatewayError {
    log_key_unavailable(&format!("{source} is not an allowed key source (see {option})"))
}

/// Logs why a backend's key is unavailable, and returns the answer to the client, which is not told why.
fn log_key_unavailable(why: &str) -> GatewayError {
    tracing::error!("backend API key unavailable: {why}");
    GatewayError::backend_key_unavailable()
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelgate_proto::error::ErrorCode;

    fn unavailable(result: Result<Option<String>, GatewayError>) -> bool {
        matches!(result, Err(e) if (e.status, e.code) == (500, Some(ErrorCode::BackendKeyUnavailable)))
    }

    /// A fresh directory of its own for each test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("modelgate-keys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn keys_come_from_allowed_files_or_the_client() {
        let dir = scratch("files");
        let file = dir.join("backend");
        std::fs::write(&file, "sk-file\n").unwrap();
        let sources =
            KeySources::with_key_files_fresh_for(Vec::new(), std::slice::from_ref(&dir), Duration::ZERO).unwrap();
        let source = ApiKey::File(file.display().to_string());
        assert_eq!(sources.resolve(&source, None).unwrap().as_deref(), Some("sk-file"));
        std::fs::remove_file(&file).unwrap();
        let gone = sources.resolve(&source, None).unwrap_err();
        assert_eq!((gone.status, gone.code), (500, Some(ErrorCode::BackendKeyUnavailable)));
        assert!(!gone.message.contains(&file.display().to_string()), "paths stay out of client messages");

        assert_eq!(
            sources.resolve(&ApiKey::Passthrough, Some(b"Bearer sk-client")).unwrap().as_deref(),
            Some("sk-client")
        );
        assert_eq!(sources.resolve(&ApiKey::Passthrough, Some(b"sk-raw")).unwrap().as_deref(), Some("sk-raw"));
        assert_eq!(sources.resolve(&ApiKey::Passthrough, None).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_file_is_read_again_once_its_contents_are_stale() {
        let dir = scratch("fresh");
        let file = dir.join("backend");
        std::fs::write(&file, "sk-old").unwrap();
        let source = ApiKey::File(file.display().to_string());
        let sources =
            KeySources::with_key_files_fresh_for(Vec::new(), std::slice::from_ref(&dir), Duration::from_secs(3600))
                .unwrap();
        assert_eq!(sources.resolve(&source, None).unwrap().as_deref(), Some("sk-old"));
        std::fs::write(&file, "sk-new").unwrap();
        assert_eq!(sources.resolve(&source, None).unwrap().as_deref(), Some("sk-old"), "still fresh: not read");
        let stale =
            KeySources::with_key_files_fresh_for(Vec::new(), std::slice::from_ref(&dir), Duration::ZERO).unwrap();
        assert_eq!(stale.resolve(&source, None).unwrap().as_deref(), Some("sk-new"));
        assert!(!format!("{sources:?}").contains("sk-"), "keys are never printed");
        // However many spellings of paths are sent, the remembered ones stay bounded.
        for n in 0..128 {
            let spelling = format!("{}/{}backend", dir.display(), "./".repeat(n));
            assert!(sources.resolve(&ApiKey::File(spelling), None).is_ok());
        }
        let held = sources.read.files.lock().unwrap().bytes();
        assert!(held > 0 && held <= MOST_KEY_FILE_BYTES, "{held} bytes held");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_the_environment_variables_named_at_start_are_read() {
        let home = std::env::var("HOME").unwrap();
        let sources = KeySources::new(vec!["HOME".into()], &[]).unwrap();
        assert_eq!(sources.resolve(&ApiKey::Env("HOME".into()), None).unwrap().as_deref(), Some(home.trim()));
        assert!(unavailable(sources.resolve(&ApiKey::Env("PATH".into()), None)), "PATH was never allowed");
        assert!(unavailable(KeySources::default().resolve(&ApiKey::Env("HOME".into()), None)));
        let unset = KeySources::new(vec!["MODELGATE_SURELY_UNSET_VARIABLE".into()], &[]).unwrap();
        assert!(unavailable(unset.resolve(&ApiKey::Env("MODELGATE_SURELY_UNSET_VARIABLE".into()), None)));
    }

    #[test]
    fn a_file_outside_the_allowed_directories_is_never_read() {
        let dir = scratch("escape");
        let (allowed, outside) = (dir.join("allowed"), dir.join("outside"));
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "sk-outside").unwrap();
        std::fs::write(allowed.join("key"), "sk-inside").unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), allowed.join("link-out")).unwrap();
        std::os::unix::fs::symlink(allowed.join("key"), outside.join("link-in")).unwrap();
        // A sibling whose name starts like the allowed directory's is not inside it.
        let sibling = dir.join("allowed-not");
        std::fs::create_dir_all(&sibling).unwrap();
        std::fs::write(sibling.join("key"), "sk-sibling").unwrap();
        let sources = KeySources::new(Vec::new(), std::slice::from_ref(&allowed)).unwrap();
        let read = |path: PathBuf| sources.resolve(&ApiKey::File(path.display().to_string()), None);

        assert_eq!(read(allowed.join("key")).unwrap().as_deref(), Some("sk-inside"));
        assert_eq!(read(allowed.join("../allowed/./key")).unwrap().as_deref(), Some("sk-inside"));
        // A symlink from outside into the directory reads a file that is inside it.
        assert_eq!(read(outside.join("link-in")).unwrap().as_deref(), Some("sk-inside"));
        for escape in [
            outside.join("secret"),
            allowed.join("../outside/secret"),
            allowed.join("link-out"),
            sibling.join("key"),
            PathBuf::from("/etc/hostname"),
            PathBuf::from("relative/key"),
        ] {
            assert!(unavailable(read(escape.clone())), "{} was read", escape.display());
        }
        assert!(unavailable(
            KeySources::default().resolve(&ApiKey::File(allowed.join("key").display().to_string()), None)
        ));
        assert!(KeySources::new(Vec::new(), &[dir.join("missing")]).is_err(), "a missing directory fails at start");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_secret_mounted_by_kubernetes_is_read_and_read_again_after_its_rotation() {
        // The kubelet's layout: `key -> ..data/key`, `..data -> ..<timestamp>/`; a rotation writes a
        // new timestamped directory and renames a fresh `..data` link over the old one.
        let dir = scratch("kubernetes-secret");
        let version = |name: &str, key: &str| {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("anthropic-api-key"), key).unwrap();
        };
        version("..2026_12_01_10_00_00.1", "sk-first\n");
        std::os::unix::fs::symlink("..2026_12_01_10_00_00.1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/anthropic-api-key", dir.join("anthropic-api-key")).unwrap();
        // Read on every request here; the second a read serves is tested apart.
        let sources =
            KeySources::with_key_files_fresh_for(Vec::new(), std::slice::from_ref(&dir), Duration::ZERO).unwrap();
        let source = ApiKey::File(dir.join("anthropic-api-key").display().to_string());
        assert_eq!(sources.resolve(&source, None).unwrap().as_deref(), Some("sk-first"));

        version("..2026_12_01_11_00_00.2", "sk-rotated\n");
        std::os::unix::fs::symlink("..2026_12_01_11_00_00.2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        std::fs::remove_dir_all(dir.join("..2026_12_01_10_00_00.1")).unwrap();
        assert_eq!(sources.resolve(&source, None).unwrap().as_deref(), Some("sk-rotated"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sources_named_by_a_request_are_logged_shortened() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(1000);
        assert_eq!(bounded(&long).chars().count(), 203);
    }
}
