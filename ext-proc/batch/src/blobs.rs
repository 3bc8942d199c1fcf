//! File contents: uploads, and the segments and output files batches write.
//! One interface over [`object_store`]: a local directory by default (each
//! object fsynced, with its directory, before a write returns), or S3-compatible
//! storage, GCS or Azure, named by URL (`s3://bucket/prefix`, `gs://…`,
//! `az://container/prefix`) with options from the environment (`AWS_*`,
//! `GOOGLE_*`, `AZURE_*`, as each store's own builder reads them).
//!
//! Keys: `files/<file id>`, `batches/<batch id>/segments/<lease token>-<n>`.

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, WriteMultipart};
use std::sync::Arc;

#[derive(Debug)]
pub enum BlobError {
    NotFound,
    /// A create-only write found the key taken.
    AlreadyExists,
    Other(String),
}

impl std::fmt::Display for BlobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlobError::NotFound => f.write_str("not found"),
            BlobError::AlreadyExists => f.write_str("already exists"),
            BlobError::Other(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for BlobError {}

impl From<object_store::Error> for BlobError {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => BlobError::NotFound,
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
                BlobError::AlreadyExists
            }
            e => BlobError::Other(e.to_string()),
        }
    }
}

/// A local write is buffered this much before it goes to the file.
const LOCAL_PART_BYTES: usize = 1 << 20;

/// S3's smallest part (but the last) of a multipart upload; GCS and Azure take it too.
const REMOTE_PART_BYTES: usize = 5 << 20;

/// Parts a writer sends at once: with the part it fills, what one upload holds in memory.
const PARTS_IN_FLIGHT: usize = 2;

/// Where file contents are kept.
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    part_bytes: usize,
}

impl Blobs {
    /// `location`: a local directory (a path, or `file:///…`), or an object
    /// store's URL, configured from the environment.
    pub fn open(location: &str) -> Result<Self, String> {
        Blobs::open_with(location, std::env::vars())
    }

    /// As [`Blobs::open`], with `options` in place of the environment's variables
    /// (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP`...): only those of the URL's store are read.
    pub fn open_with(location: &str, options: impl IntoIterator<Item = (String, String)>) -> Result<Self, String> {
        let prefix = match location.split_once("://") {
            None => return Blobs::local(location),
            Some(("file", path)) => return Blobs::local(path),
            Some(("s3" | "s3a", _)) => "AWS_",
            Some(("gs", _)) => "GOOGLE_",
            Some(("az" | "azure", _)) => "AZURE_",
            Some((scheme, _)) => {
                return Err(format!(
                    "files at {location}: unsupported scheme `{scheme}` (use a path, file://, s3://, gs:// or az://)"
                ))
            }
        };
        let url = url::Url::parse(location).map_err(|e| format!("files at {location}: {e}"))?;
        let options = options.into_iter().filter(|(key, _)| key.starts_with(prefix));
        let (store, root) =
            object_store::parse_url_opts(&url, options).map_err(|e| format!("files at {location}: {e}"))?;
        let store: Arc<dyn ObjectStore> = match root.as_ref() {
            "" => store.into(),
            _ => Arc::new(PrefixStore::new(store, root)),
        };
        Ok(Blobs { store, part_bytes: REMOTE_PART_BYTES })
    }

    fn local(dir: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("files directory {dir}: {e}"))?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| format!("files directory {dir}: {e}"))?
            // Durable before acknowledged: a written object and its directory are fsynced.
            .with_fsync(true);
        Ok(Blobs { store: Arc::new(store), part_bytes: LOCAL_PART_BYTES })
    }

    /// Starts writing `key`: pieces are pushed as they come (never all held in
    /// memory); nothing is visible under `key` until [`BlobWriter::finish`].
    pub async fn writer(&self, key: &str) -> Result<BlobWriter, BlobError> {
        let upload = self.store.put_multipart(&path(key)?).await?;
        Ok(BlobWriter { upload: WriteMultipart::new_with_chunk_size(upload, self.part_bytes), bytes: 0 })
    }

    /// Writes a small object whole, only if `key` is free ([`BlobError::AlreadyExists`] otherwise).
    pub async fn put_new(&self, key: &str, bytes: Bytes) -> Result<(), BlobError> {
        self.store.put_opts(&path(key)?, bytes.into(), PutMode::Create.into()).await?;
        Ok(())
    }

    /// The object's bytes, as they are read.
    pub async fn read(&self, key: &str) -> Result<BoxStream<'static, Result<Bytes, BlobError>>, BlobError> {
        let object = self.store.get(&path(key)?).await?;
        Ok(object.into_stream().map(|piece| piece.map_err(BlobError::from)).boxed())
    }

    /// Deletes `key`; a key already gone is fine.
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        match self.store.delete(&path(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn path(key: &str) -> Result<Path, BlobError> {
    Path::parse(key).map_err(|e| BlobError::Other(format!("bad key {key:?}: {e}")))
}

/// An object being written. Dropped without [`BlobWriter::finish`], it never
/// becomes visible (a remote store's unfinished parts are left to the bucket's
/// lifecycle rules).
pub struct BlobWriter {
    upload: WriteMultipart,
    bytes: u64,
}

impl BlobWriter {
    pub async fn push(&mut self, piece: Bytes) -> Result<(), BlobError> {
        // Waits for a part to be sent rather than buffer a fast producer's pieces.
        self.upload.wait_for_capacity(PARTS_IN_FLIGHT).await?;
        self.bytes += piece.len() as u64;
        self.upload.put(piece);
        Ok(())
    }

    /// Bytes pushed so far.
    pub fn written(&self) -> u64 {
        self.bytes
    }

    /// Makes the object durable and visible; its size in bytes.
    pub async fn finish(self) -> Result<u64, BlobError> {
        self.upload.finish().await?;
        Ok(self.bytes)
    }

    /// Drops what was written.
    pub async fn abort(self) -> Result<(), BlobError> {
        Ok(self.upload.abort().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    async fn read_all(blobs: &Blobs, key: &str) -> Result<Vec<u8>, BlobError> {
        let mut stream = blobs.read(key).await?;
        let mut bytes = Vec::new();
        while let Some(piece) = stream.next().await {
            bytes.extend_from_slice(&piece?);
        }
        Ok(bytes)
    }

    /// What every store must do; `big` pieces span several parts.
    async fn contract(blobs: &Blobs, big: usize) {
        let piece = Bytes::from(vec![b'x'; big / 4 + 1]);
        let mut writer = blobs.writer("files/file-1").await.unwrap();
        for _ in 0..4 {
            writer.push(piece.clone()).await.unwrap();
        }
        writer.push(Bytes::from_static(b"end\n")).await.unwrap();
        assert!(matches!(blobs.read("files/file-1").await, Err(BlobError::NotFound)), "visible before finish");
        let size = writer.finish().await.unwrap();
        let expected = piece.len() as u64 * 4 + 4;
        assert_eq!(size, expected);
        let back = read_all(blobs, "files/file-1").await.unwrap();
        assert_eq!(back.len() as u64, expected);
        assert!(back.ends_with(b"xend\n"));

        let mut dropped = blobs.writer("files/file-2").await.unwrap();
        dropped.push(Bytes::from_static(b"half")).await.unwrap();
        dropped.abort().await.unwrap();
        assert!(matches!(blobs.read("files/file-2").await, Err(BlobError::NotFound)));

        let empty = blobs.writer("files/empty").await.unwrap();
        assert_eq!(empty.finish().await.unwrap(), 0);
        assert_eq!(read_all(blobs, "files/empty").await.unwrap(), b"");

        let segment = "batches/batch_1/segments/lease-1";
        blobs.put_new(segment, Bytes::from_static(b"first")).await.unwrap();
        let again = blobs.put_new(segment, Bytes::from_static(b"second")).await;
        assert!(matches!(again, Err(BlobError::AlreadyExists)), "{again:?}");
        assert_eq!(read_all(blobs, segment).await.unwrap(), b"first");

        blobs.delete("files/file-1").await.unwrap();
        blobs.delete("files/file-1").await.unwrap();
        assert!(matches!(read_all(blobs, "files/file-1").await, Err(BlobError::NotFound)));
        assert!(matches!(blobs.read("files/never").await, Err(BlobError::NotFound)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_directory_keeps_objects_once_finished() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data/files");
        let blobs = Blobs::open(root.to_str().unwrap()).unwrap();
        contract(&blobs, 3 * LOCAL_PART_BYTES).await;
        // Kept where they were written: another process opening the directory finds them.
        let reopened = Blobs::open(&format!("file://{}", root.display())).unwrap();
        assert_eq!(read_all(&reopened, "batches/batch_1/segments/lease-1").await.unwrap(), b"first");
        assert!(root.join("batches/batch_1/segments/lease-1").is_file());
    }

    #[test]
    fn unknown_schemes_and_bad_urls_are_refused_at_start() {
        let refused = |location: &str| Blobs::open_with(location, []).err().unwrap_or_default();
        assert!(refused("ftp://host/files").contains("unsupported scheme `ftp`"));
        assert!(refused("s3://").contains("files at s3://"));
    }

    /// A moto S3 server on a free port, killed when dropped.
    struct Moto(Child, u16);

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn moto() -> Option<Moto> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let moto = Moto(child, port);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if http_put(port, "/bucket").is_ok_and(|status| status.contains(" 200")) {
                return Some(moto);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("moto_server did not start on port {port}");
    }

    /// A bare HTTP PUT (creates a bucket); the status line.
    fn http_put(port: u16, path: &str) -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        write!(stream, "PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer.lines().next().unwrap_or_default().to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn s3_keeps_objects_once_finished() {
        let which = Command::new("moto_server").arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status();
        if !which.is_ok_and(|status| status.success()) {
            println!("SKIPPED: moto_server is not on the PATH");
            return;
        }
        let moto = tokio::task::spawn_blocking(moto).await.unwrap().unwrap();
        let options = [
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", moto.1)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("HOME", "/ignored".into()),
        ];
        let options = || options.iter().map(|(k, v)| (k.to_string(), v.clone()));
        let blobs = Blobs::open_with("s3://bucket/modelgate", options()).unwrap();
        contract(&blobs, 2 * REMOTE_PART_BYTES).await;
        // Under the URL's prefix: a store opened at the bucket's root sees it there.
        let root = Blobs::open_with("s3://bucket", options()).unwrap();
        assert_eq!(read_all(&root, "modelgate/batches/batch_1/segments/lease-1").await.unwrap(), b"first");
    }
}
