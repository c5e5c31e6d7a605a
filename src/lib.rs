//! keygate: an OAuth 2.1 gateway, built on Pingora, for MCP servers and HTTP APIs.

pub mod admin;
pub mod app;
pub mod auth;
pub mod cache;
pub mod config;
pub mod devtoken;
pub mod error;
pub mod keys;
pub mod memory;
pub mod paths;
pub mod policy;
pub mod proxy;
pub mod redis;
pub mod retry_after;
pub mod telemetry;
