//! keygate's integration suite: one binary, real sockets, real keys, real child processes.

mod auth;
mod authz;
mod cli;
mod common;
mod conformance;
mod deploy;
mod dev_oauth;
mod devmode;
mod discovery;
mod floods;
mod harness_selfcheck;
mod identity;
mod lifetimes;
mod ops;
mod policy;
mod prometheus;
mod proxy;
mod ratelimit;
mod redis_faults;
mod routes;
mod stores;
mod vault;
mod vault_records;
