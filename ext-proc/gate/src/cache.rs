//! Cached answers and idempotency claims: in memory, or in Redis.
