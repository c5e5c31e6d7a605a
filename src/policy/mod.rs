//! Request policy: browser origins (CORS), rate limits, MCP method/tool scope rules and org
//! rules, authorization rules over the mapped identity, MCP session binding, the
//! failed-authentication budget. One file per policy.

pub mod auth_failures;
pub mod cors;
pub mod mcp;
pub mod ratelimit;
pub mod rules;
pub mod sessions;
