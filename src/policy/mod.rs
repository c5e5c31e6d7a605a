//! Request policy: browser origins (CORS), rate limits, MCP method/tool scope rules and org
//! rules, authorization rules over the mapped identity, MCP session binding, the
//! failed-authentication budget. One file per policy; `compile` builds them from the
//! `[policy]` settings at startup.

pub mod auth_failures;
mod compile;
pub mod cors;
pub mod mcp;
pub mod ratelimit;
pub mod rules;
pub mod sessions;

pub use compile::CompiledPolicy;
