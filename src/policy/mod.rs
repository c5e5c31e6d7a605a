//! Request policy that is not about who the caller is: browser origins (CORS), rate limits,
//! MCP method/tool scope rules and org rules, MCP session binding, the failed-authentication
//! budget. One file per policy.

pub mod auth_failures;
pub mod cors;
pub mod mcp;
pub mod ratelimit;
pub mod sessions;
