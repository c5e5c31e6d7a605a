//! keygate's integration suite: one binary, real sockets, real keys, real child processes.

mod auth;
mod cli;
mod common;
mod deploy;
mod devmode;
mod discovery;
mod harness_selfcheck;
mod lifetimes;
mod ops;
mod policy;
mod proxy;
mod ratelimit;
mod stores;
mod vault;
