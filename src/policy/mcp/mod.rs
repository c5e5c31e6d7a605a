//! MCP authorization by JSON-RPC method and name: reading the calls out of a Streamable HTTP POST
//! body, checking the `Mcp-Method` / `Mcp-Name` headers against that body, the scope rules
//! (method glob, optional name glob -> scopes) and the organisation rules.
//!
//! This module owns the MCP *shape* of a request and the decisions made from it. It does not
//! read the HTTP request, cap or buffer the body, check `MCP-Protocol-Version` or sessions,
//! verify tokens, or turn a denial into a response (`proxy` and `error` do that).
//!
//! Three parts, one file each: `parse` reads the calls out of a body and checks the headers
//! against them, `scopes` holds the scope rules, `org` the organisation rules.

mod org;
mod parse;
mod scopes;

pub use crate::config::file::{OrgRulesConfig, ScopeRuleConfig};
pub use org::{check_org, OrgDenial};
pub use parse::*;
pub use scopes::*;

#[cfg(test)]
mod tests;
