//! The per-user key vault: encrypted storage of each user's upstream API key, and its cache.

pub mod crypto;
pub mod embedded;
pub mod import;
pub mod redis_store;
pub mod store;
