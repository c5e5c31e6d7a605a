//! Request policy that is not about who the caller is: for now, browser origins (CORS).
//! Rate limits and scope rules will live here too, one file per policy.

pub mod cors;
