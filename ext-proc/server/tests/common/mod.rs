//! Processes for the admin port's tests: the real `modelgate-ext-proc` binary,
//! a real `redis-server`, and a minimal HTTP/1.1 client.

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port()
}

/// Waits until `process` listens on `port`; false when it exited first, most
/// likely because another test's process took the port after `free_port` chose it.
fn listening(port: u16, process: &mut Child, what: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = process.try_wait() {
            return false;
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} is not listening on {port} after 10 s");
}

/// Tries `start` on fresh ports until it listens; a few tries at most.
fn on_free_ports<T>(what: &str, mut start: impl FnMut() -> Option<T>) -> T {
    (0..5).find_map(|_| start()).unwrap_or_else(|| panic!("{what} exited at start five times"))
}

/// `redis-server` on the PATH, or why the test skips. CI installs it, so
/// there a missing one fails the test instead.
pub fn redis_server() -> Option<PathBuf> {
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

/// A throwaway Redis on a loopback port, without persistence; killed on drop.
pub struct Redis {
    binary: PathBuf,
    pub port: u16,
    process: Option<Child>,
}

impl Redis {
    pub fn start(binary: PathBuf) -> Self {
        on_free_ports("redis-server", || {
            let mut redis = Redis { binary: binary.clone(), port: free_port(), process: None };
            redis.spawn().then_some(redis)
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts it again, on the same port.
    pub fn restart(&mut self) {
        assert!(self.spawn(), "redis-server exited at restart");
    }

    fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let mut process = Command::new(&self.binary)
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        let up = listening(self.port, &mut process, "redis-server");
        self.process = Some(process);
        up
    }

    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url()).and_then(|c| c.get_connection()).expect("connecting to redis-server")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fresh directory under the system's temporary one, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("modelgate-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The ext-proc binary with its admin port on a free port; killed on drop.
pub struct ExtProc {
    pub admin: SocketAddr,
    pub grpc: SocketAddr,
    pub process: Child,
    /// Its data directory, when it is its own.
    _data: Option<TempDir>,
}

impl ExtProc {
    /// With a data directory of its own.
    pub fn start(extra: &[&str]) -> Self {
        let data = TempDir::new();
        let mut ext_proc = Self::start_on(&data.0, extra);
        ext_proc._data = Some(data);
        ext_proc
    }

    /// With `data_dir` as its data directory, which outlives it.
    pub fn start_on(data_dir: &Path, extra: &[&str]) -> Self {
        on_free_ports("modelgate-ext-proc", || Self::try_start_on(data_dir, extra))
    }

    fn try_start_on(data_dir: &Path, extra: &[&str]) -> Option<Self> {
        let (admin, grpc) = (free_port(), free_port());
        let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
        let grpc: SocketAddr = ([127, 0, 0, 1], grpc).into();
        let mut process = Command::new(env!("CARGO_BIN_EXE_modelgate-ext-proc"))
            .args(["--worker-threads", "1", "--listen", &grpc.to_string(), "--admin-listen", &admin.to_string()])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting modelgate-ext-proc");
        let up = listening(admin.port(), &mut process, "modelgate-ext-proc")
            && listening(grpc.port(), &mut process, "modelgate-ext-proc");
        up.then_some(ExtProc { admin, grpc, process, _data: None })
    }

    pub fn get(&self, path: &str) -> Answer {
        http(self.admin, "GET", path, b"")
    }

    pub fn post(&self, path: &str, body: &[u8]) -> Answer {
        http(self.admin, "POST", path, body)
    }

    /// A batch of usage records, with its id.
    pub fn post_batch(&self, id: &str, body: &[u8]) -> Answer {
        http_with(self.admin, "POST", "/v1/usage/records", &format!("x-modelgate-batch-id: {id}\r\n"), body)
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Drop for ExtProc {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// One request on its own connection, read to its end.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Answer {
    http_with(addr, method, path, "", body)
}

/// The same, with more header lines (each ending in `\r\n`).
pub fn http_with(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).expect("connecting to the admin port");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("a read timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body)).expect("sending a request");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("reading an answer");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of head: {raw:?}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer { status, headers, body: body.to_string() }
}
