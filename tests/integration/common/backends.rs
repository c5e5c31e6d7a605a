//! What a test that starts its own gateways shares between them: a fake Clerk signing with
//! `kid-a`, a recording upstream, and the two kinds of token tests present (a Clerk session
//! token for `/api/keys`, an OAuth access token for the MCP resource).

use serde_json::json;

use super::clerk::FakeClerk;
use super::keys::{self, SigningKey};
use super::upstream::Upstream;
use super::{clerk_config, RESOURCE};

pub struct Backends {
    pub clerk: FakeClerk,
    pub upstream: Upstream,
    pub key: SigningKey,
}

impl Backends {
    pub async fn start() -> Backends {
        let key = SigningKey::rsa_a("kid-a");
        Backends {
            clerk: FakeClerk::start(vec![key.clone()]).await,
            upstream: Upstream::start().await,
            key,
        }
    }

    /// The configuration of a gateway in front of these backends, plus `extra`.
    pub fn config(&self, extra: &str) -> String {
        clerk_config(&self.clerk.url(), self.clerk.secret_key(), extra)
    }

    /// A Clerk session token for `user` (what `/api/keys` takes).
    pub fn session(&self, user: &str) -> String {
        self.key.sign(
            json!({"typ": "JWT"}),
            &keys::clerk_session_claims(&self.clerk.url(), user, "sess_1"),
        )
    }

    /// An OAuth access token for `user`, issued for the MCP resource.
    pub fn access(&self, user: &str) -> String {
        self.key.sign(
            json!({"typ": "at+jwt"}),
            &keys::access_token_claims(&self.clerk.url(), user, Some(RESOURCE), "twenty:read"),
        )
    }
}
