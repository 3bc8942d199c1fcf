//! File contents: uploads, and the segments and output files batches write.
//! One interface over [`object_store`]: a local directory by default (each
//! object fsynced, with its directory, before a write returns), or S3-compatible
//! storage, GCS or Azure, named by URL (`s3://bucket/prefix`, `gs://…`,
//! `az://…`) with credentials from the environment (`AWS_*`, `GOOGLE_*`,
//! `AZURE_*`).
//!
//! Keys: `files/<file id>`, `batches/<batch id>/segments/<lease token>-<n>`.

// SKELETON: the interface; replaced by the real implementation.
#![allow(unused_variables, clippy::unused_async)]

use bytes::Bytes;
use futures_util::stream::BoxStream;

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

pub struct Blobs;

impl Blobs {
    /// `location`: a local directory (a path, or `file:///…`), or an object store's URL.
    pub fn open(location: &str) -> Result<Self, String> {
        unimplemented!()
    }

    /// Starts writing `key`: pieces are pushed as they come (never all held in
    /// memory); nothing is visible under `key` until [`BlobWriter::finish`].
    pub async fn writer(&self, key: &str) -> Result<BlobWriter, BlobError> {
        unimplemented!()
    }

    /// Writes a small object whole, only if `key` is free ([`BlobError::AlreadyExists`] otherwise).
    pub async fn put_new(&self, key: &str, bytes: Bytes) -> Result<(), BlobError> {
        unimplemented!()
    }

    /// The object's bytes, as they are read.
    pub async fn read(&self, key: &str) -> Result<BoxStream<'static, Result<Bytes, BlobError>>, BlobError> {
        unimplemented!()
    }

    /// Deletes `key`; a key already gone is fine.
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        unimplemented!()
    }
}

pub struct BlobWriter;

impl BlobWriter {
    pub async fn push(&mut self, piece: Bytes) -> Result<(), BlobError> {
        unimplemented!()
    }

    /// Makes the object durable and visible; its size in bytes.
    pub async fn finish(self) -> Result<u64, BlobError> {
        unimplemented!()
    }

    /// Drops what was written.
    pub async fn abort(self) -> Result<(), BlobError> {
        unimplemented!()
    }
}
