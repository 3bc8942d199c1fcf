//! The gate on ext-proc's admin port ([`modelgate_proto::gate`]): what the
//! filter asks before a request goes to its backend (an idempotent repeat,
//! a cached answer, a budget's room), and the answers it hands back to keep.
//!
//! - [`cache`]: cached answers and idempotency claims, in memory (LRU,
//!   bounded in bytes) or in Redis;
//! - [`budgets`]: spend and token budgets per key, in SQLite or Redis,
//!   settled from usage records;
//! - [`api`]: the routes, `POST /v1/gate`, `POST /v1/gate/store` and
//!   `GET /v1/usage/budgets`.

pub mod api;
pub mod budgets;
pub mod cache;
