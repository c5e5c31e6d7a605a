//! Request policy that is not about who the caller is: browser origins (CORS), rate limits,
//! MCP method/tool scope rules and org rules, MCP session binding. One file per policy.

pub mod cors;
pub mod mcp;
pub mod ratelimit;
pub mod sessions;
