//! modelgate's Files and Batch APIs, beside ext_proc.
//!
//! - [`api`]: `/v1/files` and `/v1/batches`, served on ext-proc's admin port
//!   and reached through Envoy's listener (the filter checks the client's key
//!   and names its owner).
//! - [`store`]: batch and file metadata, in SQLite on one machine or in Redis
//!   shared by several replicas; [`blobs`]: file contents, on local disk or in
//!   object storage.
//! - [`runner`]: runs each batch, holding a lease so one replica runs it at a
//!   time, and sends every line through Envoy's listener as the batch's owner.

pub mod api;
pub mod args;
pub mod blobs;
pub mod ids;
pub mod runner;
pub mod store;

