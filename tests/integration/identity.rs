//! Identity is (issuer, subject): with two trusted issuers, equal `sub` values share no key
//! slot and no budget, and records written before slots named the issuer still open.

use serde_json::{json, Value};

use crate::common::clerk::FakeClerk;
use crate::common::keys::{self, SigningKey};
use crate::common::upstream::Upstream;
use crate::common::{clerk_config, client, Keygate, RESOURCE};

const SECRET: &str = "3f8a1c9e57b2d4067e1fa93c28d5b6409c7e2a15f3b8d06e4a91c7253df80b6e";

/// Clerk (RSA, `kid-a`) and a second OIDC issuer (EC, `oidc-ec`), both trusted by one keygate.
struct TwoIssuers {
    clerk: FakeClerk,
    idp: FakeClerk,
    clerk_key: SigningKey,
    idp_key: SigningKey,
    upstream: Upstream,
    gw: Keygate,
    dir: std::path::PathBuf,
}

impl TwoIssuers {
    async fn start(extra: &str) -> TwoIssuers {
        let clerk_key = SigningKey::rsa_a("kid-a");
        let idp_key = SigningKey::ec_a("oidc-ec");
        let clerk = FakeClerk::start(vec![clerk_key.clone()]).await;
        let idp = FakeClerk::start(vec![idp_key.clone()]).await;
        let upstream = Upstream::start().await;
        let dir = std::env::temp_dir().join(format!(
            "keygate-identity-{}-{}",
            std::process::id(),
            crate::common::free_port()
        ));
        let toml = clerk_config(
            &clerk.url(),
            clerk.secret_key(),
            &format!(
                "[keys]\nencryption_secret = \"{SECRET}\"\ndata_dir = \"{dir}\"\n\
                 [[issuers]]\nissuer = \"{iss}\"\nalgorithms = [\"ES256\"]\n{extra}",
                dir = dir.display(),
                iss = idp.url(),
            ),
        );
        let gw = Keygate::start(&toml, &upstream.url()).await;
        gw.wait_ready().await;
        TwoIssuers {
            clerk,
            idp,
            clerk_key,
            idp_key,
            upstream,
            gw,
            dir,
        }
    }

    fn clerk_session(&self, sub: &str) -> String {
        self.clerk_key.sign(
            json!({"typ": "JWT"}),
            &keys::clerk_session_claims(&self.clerk.url(), sub, "sess_1"),
        )
    }

    fn clerk_access(&self, sub: &str) -> String {
        self.clerk_key.sign(
            json!({"typ": "at+jwt"}),
            &keys::access_token_claims(&self.clerk.url(), sub, Some(RESOURCE), "twenty:read"),
        )
    }

    /// The other issuer's access token for the same resource.
    fn idp_access(&self, sub: &str) -> String {
        self.idp_key.sign(
            json!({"typ": "at+jwt"}),
            &keys::access_token_claims(&self.idp.url(), sub, Some(RESOURCE), "twenty:read"),
        )
    }

    async fn keys(&self, method: reqwest::Method, token: &str, body: Option<Value>) -> Value {
        let mut req = client()
            .request(method, self.gw.at("/api/keys"))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        assert_eq!(resp.status(), 200);
        resp.json().await.expect("json")
    }

    /// A `ping` through keygate as `token`; the status, and the key the upstream received.
    async fn call(&self, token: &str) -> (u16, Option<String>) {
        let before = self.upstream.count();
        let resp = client()
            .post(self.gw.at("/mcp"))
            .bearer_auth(token)
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
            .send()
            .await
            .expect("request");
        let status = resp.status().as_u16();
        if self.upstream.count() == before {
            return (status, None);
        }
        let seen = self.upstream.last().expect("forwarded");
        let key = url::form_urlencoded::parse(seen.query.as_deref().unwrap_or("").as_bytes())
            .find(|(k, _)| k == "apiKey")
            .map(|(_, v)| v.into_owned());
        (status, key)
    }
}

impl Drop for TwoIssuers {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn equal_subjects_of_two_issuers_share_no_key() {
    let t = TwoIssuers::start("").await;
    let stored = json!({"success": true, "message": "API key stored successfully"});
    assert_eq!(
        t.keys(
            reqwest::Method::POST,
            &t.clerk_session("user_1"),
            Some(json!({"apiKey": "clerk_users_key"}))
        )
        .await,
        stored
    );

    // The other issuer's user_1 is someone else: no key, nothing injected, nothing to delete.
    let other = t.idp_access("user_1");
    let meta = t.keys(reqwest::Method::GET, &other, None).await;
    assert_eq!(meta["hasKey"], false);
    assert_eq!(t.call(&other).await, (400, None));
    t.keys(reqwest::Method::DELETE, &other, None).await;
    assert_eq!(
        t.call(&t.clerk_access("user_1")).await,
        (200, Some("clerk_users_key".to_string())),
        "the other issuer's delete did not touch the Clerk user's key"
    );

    // Each stores and gets their own.
    assert_eq!(
        t.keys(
            reqwest::Method::POST,
            &other,
            Some(json!({"apiKey": "idp_users_key"}))
        )
        .await,
        stored
    );
    assert_eq!(
        t.call(&other).await,
        (200, Some("idp_users_key".to_string()))
    );
    // The upstream is told which issuer vouched for the user, whatever the client claims.
    let seen = t.upstream.last().expect("forwarded");
    assert_eq!(seen.header("x-keygate-user"), Some("user_1"));
    assert_eq!(seen.header("x-keygate-issuer"), Some(t.idp.url().as_str()));
    let before = t.upstream.count();
    let resp = client()
        .post(t.gw.at("/mcp"))
        .bearer_auth(t.clerk_access("user_1"))
        .header("x-keygate-issuer", t.idp.url())
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(t.upstream.count(), before + 1);
    let seen = t.upstream.last().expect("forwarded");
    assert_eq!(
        seen.header("x-keygate-issuer"),
        Some(t.clerk.url().as_str())
    );
    assert_eq!(
        t.call(&t.clerk_access("user_1")).await,
        (200, Some("clerk_users_key".to_string()))
    );
    let meta = t
        .keys(reqwest::Method::GET, &t.clerk_session("user_1"), None)
        .await;
    assert_eq!(meta["hasKey"], true);
}

#[tokio::test]
async fn equal_subjects_of_two_issuers_have_their_own_budgets() {
    let t = TwoIssuers::start(
        "[[rate_limits.rules]]\nname = \"per-user\"\nper = \"user\"\nrequests = 1\nperiod_secs = 3600\n",
    )
    .await;
    for token in [t.clerk_session("user_1"), t.idp_access("user_1")] {
        t.keys(reqwest::Method::POST, &token, Some(json!({"apiKey": "k"})))
            .await;
    }
    // Each issuer's user_1 spent its own single request above.
    let limited = client()
        .get(t.gw.at("/api/keys"))
        .bearer_auth(t.clerk_session("user_1"))
        .send()
        .await
        .expect("request");
    assert_eq!(limited.status(), 429);
    let limited = client()
        .get(t.gw.at("/api/keys"))
        .bearer_auth(t.idp_access("user_1"))
        .send()
        .await
        .expect("request");
    assert_eq!(limited.status(), 429);
}

#[tokio::test]
async fn records_written_under_the_subject_alone_still_open_for_clerk_users() {
    // A record in the pre-issuer slot format (`user:<sub>`), sealed for that slot, as earlier
    // versions and the Node import wrote it, put straight into the embedded store.
    let dir = std::env::temp_dir().join(format!(
        "keygate-identity-legacy-{}-{}",
        std::process::id(),
        crate::common::free_port()
    ));
    {
        let keyring = keygate::keys::crypto::Keyring::from_secrets(SECRET, &[]).expect("keyring");
        let store = keygate::keys::embedded::EmbeddedStore::open(&dir).expect("store");
        let owner = keygate::keys::store::Owner::user("user_legacy");
        let sealed = keyring.seal(b"legacy_key", &owner.slot()).expect("seal");
        let record = keygate::keys::store::StoredRecord {
            sealed,
            base_url: None,
            updated_at: 1_700_000_000,
        };
        keygate::keys::store::KeyStore::put(&store, &owner, &record)
            .await
            .expect("put");
    }
    let key = SigningKey::rsa_a("kid-a");
    let clerk = FakeClerk::start(vec![key.clone()]).await;
    let upstream = Upstream::start().await;
    let gw = Keygate::start(
        &clerk_config(
            &clerk.url(),
            clerk.secret_key(),
            &format!(
                "[keys]\nencryption_secret = \"{SECRET}\"\ndata_dir = \"{}\"\n",
                dir.display()
            ),
        ),
        &upstream.url(),
    )
    .await;
    gw.wait_ready().await;
    let token = key.sign(
        json!({"typ": "at+jwt"}),
        &keys::access_token_claims(&clerk.url(), "user_legacy", Some(RESOURCE), "twenty:read"),
    );
    let resp = client()
        .post(gw.at("/mcp"))
        .bearer_auth(&token)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let seen = upstream.last().expect("forwarded");
    assert!(seen
        .query
        .as_deref()
        .is_some_and(|q| q.contains("apiKey=legacy_key")));
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}
