//! What modelgate's processes beside Envoy (ext-proc and the stream guard)
//! share: how they start and drain ([`process`]), the probes they answer
//! ([`health`]), the token their loopback ports ask of callers ([`internal_token`]),
//! and, with the `redis` and `sqlite` features, how the stores kept in Redis reach it
//! ([`redis_connection`]) and those kept in SQLite open it ([`sqlite_database`]).

pub mod health;
pub mod internal_token;
pub mod process;
#[cfg(feature = "redis")]
pub mod redis_connection;
#[cfg(feature = "sqlite")]
pub mod sqlite_database;
