//! modelgate's admin port, served by the ext-proc process: usage records in
//! ([`routes`]), [`metrics`] and the [`usage_report`] out, kept in the
//! [`usage_store`] (local disk, or Redis for several gateways), and rate
//! limits shared through Redis ([`shared_limits`]).

mod low_priority;
pub mod metrics;
pub mod routes;
pub mod shared_limits;
pub mod usage_report;
pub mod usage_store;
