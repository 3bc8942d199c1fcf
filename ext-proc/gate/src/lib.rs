//! The gate on ext-proc's admin port ([`modelgate_proto::gate`]): what the
//! filter asks before a request goes to its backend (an idempotent repeat,
//! a cached answer, a budget's room), and the answers it hands back to keep.
//!
//! - [`gate`]: the decisions (an idempotent repeat, then the cache, then the
//!   budgets) and the answers kept;
//! - [`cache`]: cached answers and idempotency claims, in memory (LRU,
//!   bounded in bytes) or in Redis;
//! - [`budgets`]: spend and token budgets per key, in SQLite or Redis,
//!   settled from usage records;
//! - [`api`]: the routes, `POST /v1/gate` and `POST /v1/gate/store`;
//! - [`error_answers`]: how the admin port's routes, these and admin's, answer errors.

pub mod api;
pub mod budgets;
pub mod cache;
pub mod error_answers;
pub mod gate;
