//! The stores under test: SQLite in a temporary directory, and a real
//! `redis-server` on a free loopback port.

use modelgate_batch::store::Meta;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// One store's storage, and how to open a new client on it (a reopened file,
/// a new Redis connection): what one client wrote, the next must read.
pub struct Backend {
    open: Box<dyn Fn() -> Meta>,
    _storage: Box<dyn std::any::Any>,
}

impl Backend {
    pub fn open(&self) -> Meta {
        (self.open)()
    }

    pub fn sqlite() -> Option<Backend> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("data");
        Some(Backend {
            open: Box::new(move || Meta::open(None, &path, REDIS_TIMEOUT).expect("opening SQLite")),
            _storage: Box::new(dir),
        })
    }

    pub fn redis() -> Option<Backend> {
        let redis = Redis::start()?;
        let url = redis.url();
        let data_dir = PathBuf::from("/nonexistent");
        Some(Backend {
            open: Box::new(move || Meta::open(Some(&url), &data_dir, REDIS_TIMEOUT).expect("opening Redis")),
            _storage: Box::new(redis),
        })
    }
}

/// `redis-server` on the PATH, or why the test skips. CI installs it, so
/// there a missing one fails the test instead.
fn redis_server() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join("redis-server")).find(|p| p.is_file()));
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "redis-server is not on the PATH, and .ci/run installs it");
        eprintln!(
            "SKIPPED: redis-server is not on the PATH (Debian: apt-get install redis-server; .ci/run installs it)"
        );
    }
    found
}

/// A throwaway Redis without persistence; killed on drop.
pub struct Redis {
    port: u16,
    process: Child,
}

impl Redis {
    /// None when the test skips (no `redis-server`). Another process may take
    /// the port between choosing and binding it: a few tries.
    pub fn start() -> Option<Redis> {
        let binary = redis_server()?;
        Some((0..5).find_map(|_| Redis::spawn(&binary)).expect("redis-server exited at start five times"))
    }

    fn spawn(binary: &PathBuf) -> Option<Redis> {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let process = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        // Killed and waited for on drop, whichever way this returns.
        let mut redis = Redis { port, process };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = redis.process.try_wait() {
                return None;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(redis);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server is not listening on {port} after 10 s");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops it answering, connections kept open: a Redis that hangs.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.process.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill {signal} redis-server");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}
