//! SKELETON: replaced by the real store.
#![allow(unused_variables, clippy::unused_async)]
use super::*;

pub struct RedisMeta;

impl RedisMeta {
    pub fn new(url: &str, timeout: Duration) -> std::result::Result<Self, String> {
        unimplemented!()
    }
    pub async fn insert_file(&self, record: &FileRecord) -> Result<()> {
        unimplemented!()
    }
    pub async fn file(&self, owner: &str, id: &str, now: u64) -> Result<Option<FileRecord>> {
        unimplemented!()
    }
    pub async fn list_files(&self, owner: &str, query: &FileQuery, now: u64) -> Result<Page<FileRecord>> {
        unimplemented!()
    }
    pub async fn delete_file(&self, owner: &str, id: &str) -> Result<Deletion> {
        unimplemented!()
    }
    pub async fn expired_files(&self, now: u64, limit: usize) -> Result<Vec<FileRecord>> {
        unimplemented!()
    }
    pub async fn insert_batch(&self, record: &BatchRecord) -> Result<()> {
        unimplemented!()
    }
    pub async fn batch(&self, owner: &str, id: &str) -> Result<Option<BatchRecord>> {
        unimplemented!()
    }
    pub async fn list_batches(&self, owner: &str, after: Option<&str>, limit: usize) -> Result<Page<BatchRecord>> {
        unimplemented!()
    }
    pub async fn request_cancel(&self, owner: &str, id: &str, at: u64) -> Result<Option<BatchRecord>> {
        unimplemented!()
    }
    pub async fn active_batches(&self) -> Result<Vec<String>> {
        unimplemented!()
    }
    pub async fn acquire(&self, batch_id: &str, holder: &str, ttl: Duration) -> Result<Option<Lease>> {
        unimplemented!()
    }
    pub async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool> {
        unimplemented!()
    }
    pub async fn release(&self, lease: &Lease) -> Result<()> {
        unimplemented!()
    }
    pub async fn running(&self, batch_id: &str) -> Result<Option<(BatchRecord, Vec<String>)>> {
        unimplemented!()
    }
    pub async fn save(&self, lease: &Lease, progress: Progress<'_>) -> Result<bool> {
        unimplemented!()
    }
}
