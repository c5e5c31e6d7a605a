//! Authorization for any identity provider, through the running gateway: claim mapping for
//! tokens shaped like Auth0, Keycloak, Entra ID, Clerk v2 session tokens and a seed-style
//! issuer, and the `[[policy.rules]]` examples of the README (roles per tool, org allowlist,
//! fresh MFA for `/api/keys` writes, contractor hours, email-domain allowlists).

use std::process::Command;

use serde_json::{json, Map, Value};

use crate::common::clerk::FakeClerk;
use crate::common::keys::{self, SigningKey};
use crate::common::upstream::Upstream;
use crate::common::{clerk_config, client, Keygate, TempDir, RESOURCE};

const SECRET: &str = "3f8a1c9e57b2d4067e1fa93c28d5b6409c7e2a15f3b8d06e4a91c7253df80b6e";

/// Clerk plus one other issuer (`idp`, ES256) whose claim mapping and the policy are the
/// test's; the vault is on so `/api/keys` can be exercised.
struct Authz {
    clerk: FakeClerk,
    idp: FakeClerk,
    clerk_key: SigningKey,
    idp_key: SigningKey,
    upstream: Upstream,
    gw: Keygate,
}

impl Authz {
    /// `claims`: the body of the idp's `[issuers.claims]`; `policy`: TOML after it.
    async fn start(claims: &str, policy: &str) -> Authz {
        Self::start_with_clock(claims, policy, None).await
    }

    async fn start_with_clock(
        claims: &str,
        policy: &str,
        clock: Option<keygate::policy::rules::Clock>,
    ) -> Authz {
        let clerk_key = SigningKey::rsa_a("kid-a");
        let idp_key = SigningKey::ec_a("idp-ec");
        let clerk = FakeClerk::start(vec![clerk_key.clone()]).await;
        let idp = FakeClerk::start(vec![idp_key.clone()]).await;
        let upstream = Upstream::start().await;
        let data = TempDir::new("authz");
        let toml = clerk_config(
            &clerk.url(),
            clerk.secret_key(),
            &format!(
                "[keys]\nencryption_secret = \"{SECRET}\"\ndata_dir = \"{dir}\"\nfallback_api_key = \"a-shared-key\"\n\
                 [[issuers]]\nissuer = \"{iss}\"\nalgorithms = [\"ES256\"]\n\
                 [issuers.claims]\n{claims}\n{policy}",
                dir = data.path().display(),
                iss = idp.url(),
            ),
        );
        let gw = Keygate::start_with_settings(&toml, &upstream.url(), &[], |g| {
            if let Some(c) = clock {
                g.compiled.policy.clock = c;
            }
        })
        .await
        .keep(data);
        gw.wait_ready().await;
        Authz {
            clerk,
            idp,
            clerk_key,
            idp_key,
            upstream,
            gw,
        }
    }

    /// An access token from the idp for the test resource, with `extra` claims on top of
    /// `sub`, `iss`, `aud`, `iat`, `nbf`, `exp` (a `null` removes one).
    fn idp_token(&self, extra: Value) -> String {
        let now = keys::now();
        let mut claims = json!({
            "sub": "user_1", "iss": self.idp.url(), "aud": RESOURCE,
            "iat": now, "nbf": now, "exp": now + 300,
        });
        merge(&mut claims, extra);
        self.idp_key.sign(json!({"typ": "at+jwt"}), &claims)
    }

    /// A Clerk v2 session token with `extra` claims on top.
    fn clerk_session(&self, extra: Value) -> String {
        let mut claims = keys::clerk_session_claims(&self.clerk.url(), "user_1", "sess_1");
        merge(&mut claims, extra);
        self.clerk_key.sign(json!({"typ": "JWT"}), &claims)
    }

    /// `tools/call` of `tool` as `token`: (status, body).
    async fn call_tool(&self, token: &str, tool: &str) -> (u16, Value) {
        let resp = client()
            .post(self.gw.at("/mcp"))
            .bearer_auth(token)
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                          "params": {"name": tool, "arguments": {}}}))
            .send()
            .await
            .expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// A request to `/api/keys` as `token`: (status, WWW-Authenticate, body).
    async fn keys(&self, method: reqwest::Method, token: &str) -> (u16, Option<String>, Value) {
        let mut req = client()
            .request(method.clone(), self.gw.at("/api/keys"))
            .bearer_auth(token);
        if method == reqwest::Method::POST {
            req = req.json(&json!({"apiKey": "a-twenty-key"}));
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let challenge = resp
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (status, challenge, resp.json().await.unwrap_or(Value::Null))
    }
}

fn merge(into: &mut Value, extra: Value) {
    let Value::Object(extra) = extra else { return };
    let into: &mut Map<String, Value> = into.as_object_mut().expect("object");
    for (k, v) in extra {
        if v.is_null() {
            into.remove(&k);
        } else {
            into.insert(k, v);
        }
    }
}

/// The refusal's rule and reason, as the body names them.
fn refusal(body: &Value) -> (&str, &str) {
    (
        body["rule"].as_str().unwrap_or("?"),
        body["reason"].as_str().unwrap_or("?"),
    )
}

/// The README's role example: read tools for `member`, write tools for `manager` / `admin`,
/// `delete_*` only for `admin` (first match wins).
const ROLE_RULES: &str = r#"
[[policy.rules]]
name = "delete-tools-admin-only"
method = "tools/call"
call_name = "delete_*"
roles = ["admin"]

[[policy.rules]]
name = "write-tools-managers"
method = "tools/call"
call_name = "{create,update}_*"
roles = ["manager", "admin"]

[[policy.rules]]
name = "read-tools-members"
method = "tools/call"
roles = ["member", "manager", "admin"]
"#;

#[tokio::test]
async fn keycloak_realm_roles_decide_read_write_and_delete_tools() {
    let t = Authz::start("roles = \"realm_access.roles\"", ROLE_RULES).await;
    let as_role =
        |role: &str| t.idp_token(json!({"realm_access": {"roles": [role, "offline_access"]}}));
    let expect = [
        ("member", "get_person", Ok(())),
        ("member", "create_person", Err("write-tools-managers")),
        ("member", "delete_person", Err("delete-tools-admin-only")),
        ("manager", "get_person", Ok(())),
        ("manager", "update_person", Ok(())),
        ("manager", "delete_person", Err("delete-tools-admin-only")),
        ("admin", "delete_person", Ok(())),
        ("guest", "get_person", Err("read-tools-members")),
    ];
    for (role, tool, want) in expect {
        let (status, body) = t.call_tool(&as_role(role), tool).await;
        match want {
            Ok(()) => assert_eq!(status, 200, "{role} {tool}: {body}"),
            Err(rule) => {
                assert_eq!(status, 403, "{role} {tool}: {body}");
                assert_eq!(refusal(&body), (rule, "role"), "{role} {tool}");
            }
        }
    }
    // A token whose mapped roles claim is missing is refused, naming the mapping.
    let (status, body) = t.call_tool(&t.idp_token(json!({})), "get_person").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(refusal(&body), ("claims.roles", "claim_missing"));
    // The wrong type too.
    let (status, body) = t
        .call_tool(
            &t.idp_token(json!({"realm_access": {"roles": {"admin": true}}})),
            "get_person",
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(refusal(&body), ("claims.roles", "claim_type"));
    let metrics = t.gw.metrics_text().await;
    assert!(
        metrics.contains(
            "keygate_policy_denials_total{reason=\"role\",rule=\"delete-tools-admin-only\"} 2"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "keygate_policy_denials_total{reason=\"claim_missing\",rule=\"claims.roles\"} 1"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn keycloak_client_roles_are_reachable_by_path() {
    let t = Authz::start("roles = \"resource_access.mcp-app.roles\"", ROLE_RULES).await;
    let token = t.idp_token(json!({
        "realm_access": {"roles": ["admin"]},
        "resource_access": {"mcp-app": {"roles": ["member"]}, "other": {"roles": ["admin"]}},
    }));
    assert_eq!(t.call_tool(&token, "get_person").await.0, 200);
    let (status, body) = t.call_tool(&token, "delete_person").await;
    assert_eq!(status, 403);
    assert_eq!(refusal(&body), ("delete-tools-admin-only", "role"));
}

#[tokio::test]
async fn auth0_permissions_and_namespaced_org_claim_are_the_identity_upstream() {
    let t = Authz::start(
        r#"scopes = "permissions"
org_id = '"https://example.com/org".id'
org_role = ["https://example.com/org", "role"]"#,
        r#"
[[policy.rules]]
name = "writes-need-crm-write"
method = "tools/call"
call_name = "{create,update,delete}_*"
scopes = ["write:crm"]
roles = ["manager"]
"#,
    )
    .await;
    let token = |perms: Value| {
        t.idp_token(json!({
            "permissions": perms,
            "https://example.com/org": {"id": "org_acme", "role": "manager"},
            "scope": "openid profile",
        }))
    };
    let (status, _) = t
        .call_tool(&token(json!(["read:crm", "write:crm"])), "create_note")
        .await;
    assert_eq!(status, 200);
    let seen = t.upstream.last().expect("forwarded");
    assert_eq!(seen.header("x-keygate-org"), Some("org_acme"));
    assert_eq!(seen.header("x-keygate-scopes"), Some("read:crm write:crm"));
    let (status, body) = t
        .call_tool(&token(json!(["read:crm"])), "create_note")
        .await;
    assert_eq!(status, 403);
    assert_eq!(
        refusal(&body),
        ("writes-need-crm-write", "insufficient_scope")
    );
    // The namespaced org claim absent: refused as such, never "no org".
    let bare = t.idp_token(json!({"permissions": ["read:crm"]}));
    let (status, body) = t.call_tool(&bare, "get_note").await;
    assert_eq!(status, 403);
    assert_eq!(refusal(&body), ("claims.org_id", "claim_missing"));
    assert_eq!(t.upstream.count(), 1);
}

#[tokio::test]
async fn entra_roles_and_space_separated_scp_map() {
    let t = Authz::start(
        "roles = \"roles\"\nscopes = \"scp\"\nuser_id = \"oid\"",
        r#"
[[policy.rules]]
name = "crm-writers"
method = "tools/call"
call_name = "create_*"
roles = ["Crm.Writer"]
scopes = ["Crm.ReadWrite"]
"#,
    )
    .await;
    let token = t.idp_token(json!({
        "oid": "00000000-0000-0000-0000-00000000beef",
        "roles": ["Crm.Writer"],
        "scp": "Crm.Read Crm.ReadWrite",
    }));
    assert_eq!(t.call_tool(&token, "create_person").await.0, 200);
    let seen = t.upstream.last().expect("forwarded");
    assert_eq!(
        seen.header("x-keygate-user"),
        Some("00000000-0000-0000-0000-00000000beef")
    );
    let reader = t.idp_token(json!({
        "oid": "00000000-0000-0000-0000-00000000cafe",
        "roles": ["Crm.Writer"],
        "scp": "Crm.Read",
    }));
    let (status, body) = t.call_tool(&reader, "create_person").await;
    assert_eq!(status, 403);
    assert_eq!(refusal(&body), ("crm-writers", "insufficient_scope"));
}

#[tokio::test]
async fn seed_style_tokens_org_allowlist_and_email_domains() {
    let t = Authz::start(
        "org_id = \"organizationId\"\nroles = \"roles\"\nemail = \"email\"",
        r#"
[policy]
email_domains = ["company.com", "company.co"]

[[policy.rules]]
name = "acme-and-globex-only"
paths = ["/mcp"]
orgs = ["org_acme", "org_globex"]
"#,
    )
    .await;
    let seed = |email: &str, org: &str| {
        t.idp_token(json!({"email": email, "organizationId": org, "roles": ["member"]}))
    };
    for email in ["ana@company.com", "bo@company.co", "cy@COMPANY.com"] {
        assert_eq!(
            t.call_tool(&seed(email, "org_acme"), "get_x").await.0,
            200,
            "{email}"
        );
    }
    let (status, body) = t
        .call_tool(&seed("ana@company.com", "org_initech"), "get_x")
        .await;
    assert_eq!(status, 403);
    assert_eq!(refusal(&body), ("acme-and-globex-only", "org"));
    for trick in [
        "eve@company.com.evil.io",
        "evil@company.com@x",
        "eve@evilcompany.com",
        "eve@sub.company.com",
        "eve@company.co.uk",
    ] {
        let (status, body) = t.call_tool(&seed(trick, "org_acme"), "get_x").await;
        assert_eq!(status, 403, "{trick}");
        assert_eq!(
            refusal(&body),
            ("policy.email_domains", "email_domain"),
            "{trick}"
        );
    }
    // Where the issuer says the address is unverified, it does not count.
    let unverified = t.idp_token(json!({"email": "ana@company.com", "email_verified": false,
        "organizationId": "org_acme", "roles": ["member"]}));
    let (status, body) = t.call_tool(&unverified, "get_x").await;
    assert_eq!(status, 403);
    assert_eq!(refusal(&body), ("policy.email_domains", "email_unverified"));
}

/// The README's `/api/keys` example: storing or deleting a key needs a second factor verified
/// in the last 10 minutes; reading the key's metadata does not.
const KEYS_MFA_RULE: &str = r#"
[[policy.rules]]
name = "key-writes-need-fresh-mfa"
paths = ["/api/keys"]
http_methods = ["POST", "DELETE"]
mfa_max_age_mins = 10
"#;

#[tokio::test]
async fn key_writes_need_mfa_within_ten_minutes_for_clerk_sessions() {
    let t = Authz::start("", KEYS_MFA_RULE).await;
    let fva = |second: i64| t.clerk_session(json!({"fva": [1, second]}));
    let (status, _, body) = t.keys(reqwest::Method::GET, &fva(-1)).await;
    assert_eq!(status, 200, "{body}");
    for stale in [-1, 11, 600] {
        for method in [reqwest::Method::POST, reqwest::Method::DELETE] {
            let (status, challenge, body) = t.keys(method.clone(), &fva(stale)).await;
            assert_eq!(status, 403, "{method} fva {stale}: {body}");
            assert_eq!(refusal(&body), ("key-writes-need-fresh-mfa", "mfa"));
            assert_eq!(body["max_age"], 600);
            // A session token's client cannot step up through OAuth: no challenge.
            assert_eq!(challenge, None);
        }
    }
    let no_fva = t.clerk_session(json!({}));
    assert_eq!(t.keys(reqwest::Method::POST, &no_fva).await.0, 403);
    let (status, _, body) = t.keys(reqwest::Method::POST, &fva(3)).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = t.keys(reqwest::Method::DELETE, &fva(9)).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn key_writes_with_oauth_tokens_get_a_step_up_challenge() {
    let t = Authz::start("", KEYS_MFA_RULE).await;
    let now = keys::now();
    let password_only = t.idp_token(json!({"amr": ["pwd"], "auth_time": now - 60}));
    let (status, challenge, body) = t.keys(reqwest::Method::POST, &password_only).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(refusal(&body), ("key-writes-need-fresh-mfa", "mfa"));
    assert_eq!(body["error"], "insufficient_user_authentication");
    let challenge = challenge.expect("a challenge");
    assert!(
        challenge.starts_with("Bearer error=\"insufficient_user_authentication\""),
        "{challenge}"
    );
    assert!(challenge.contains("max_age=600"), "{challenge}");
    let stale = t.idp_token(json!({"amr": ["pwd", "mfa"], "auth_time": now - 11 * 60}));
    assert_eq!(t.keys(reqwest::Method::POST, &stale).await.0, 403);
    let fresh = t.idp_token(json!({"amr": ["pwd", "mfa"], "auth_time": now - 120}));
    let (status, _, body) = t.keys(reqwest::Method::POST, &fresh).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn clerk_v2_org_role_from_the_o_claim_is_a_role() {
    let t = Authz::start(
        "",
        &format!("{ROLE_RULES}\n[auth]\nsession_token_paths = [\"/api/keys\", \"/mcp\"]\n"),
    )
    .await;
    let role = |rol: &str| {
        t.clerk_session(
            json!({"o": {"id": "org_1", "slg": "one", "rol": rol, "per": "", "fpm": ""}}),
        )
    };
    assert_eq!(t.call_tool(&role("admin"), "delete_person").await.0, 200);
    let (status, body) = t.call_tool(&role("member"), "delete_person").await;
    assert_eq!(status, 403);
    assert_eq!(refusal(&body), ("delete-tools-admin-only", "role"));
    assert_eq!(t.call_tool(&role("member"), "get_person").await.0, 200);
}

/// The README's contractor example: contractors read only Mon–Fri 09:00–17:00 Berlin time and
/// never write; members are not affected. The clock is the test's.
#[tokio::test]
async fn contractors_only_on_weekdays_in_office_hours() {
    // Wednesday 2026-07-15 10:00 in Berlin (CEST, UTC+2).
    let wed_10 = 1_784_102_400;
    let clock = keygate::policy::rules::Clock::fixed(wed_10);
    let t = Authz::start_with_clock(
        "roles = \"roles\"",
        &format!(
            r#"
[[policy.rules]]
name = "contractor-hours"
for_roles = ["contractor"]
method = "tools/call"
call_name = "{{get,list,search}}_*"
days = ["mon", "tue", "wed", "thu", "fri"]
hours = "09:00-17:00"
time_zone = "Europe/Berlin"
{ROLE_RULES}"#
        ),
        Some(clock.clone()),
    )
    .await;
    let contractor = t.idp_token(json!({"roles": ["contractor"]}));
    let member = t.idp_token(json!({"roles": ["member"]}));
    assert_eq!(t.call_tool(&contractor, "get_person").await.0, 200);
    let (status, body) = t.call_tool(&contractor, "create_person").await;
    assert_eq!(status, 403);
    assert_eq!(refusal(&body), ("write-tools-managers", "role"));
    for (at, what) in [
        (wed_10 + 7 * 3600, "17:00 Wednesday"),
        (wed_10 - 3600 - 60, "08:59 Wednesday"),
        (wed_10 + 3 * 86_400, "10:00 Saturday"),
        (wed_10 + 4 * 86_400, "10:00 Sunday"),
    ] {
        clock.set(at);
        let (status, body) = t.call_tool(&contractor, "get_person").await;
        assert_eq!(status, 403, "{what}");
        assert_eq!(
            refusal(&body),
            ("contractor-hours", "time_window"),
            "{what}"
        );
        assert_eq!(t.call_tool(&member, "get_person").await.0, 200, "{what}");
    }
    clock.set(wed_10 + 7 * 3600 - 60);
    assert_eq!(t.call_tool(&contractor, "get_person").await.0, 200, "16:59");
}

/// `keygate check-config` on `toml`: (exit code, stderr).
fn check_config(toml: &str) -> (Option<i32>, String) {
    let dir = TempDir::new("authz-config");
    let path = dir.join("keygate.toml");
    std::fs::write(&path, toml).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["--config", path.to_str().expect("path"), "check-config"])
        .env_remove("KEYGATE_CONFIG")
        .env_remove("AUTH_ENABLED")
        .env_remove("CLERK_PUBLISHABLE_KEY")
        .env_remove("API_KEY_ENCRYPTION_SECRET")
        .output()
        .expect("run keygate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_rejects_impossible_rules_naming_the_option() {
    let base = r#"
[keys]
enabled = false
[[issuers]]
issuer = "https://idp.example.com"
jwks_url = "https://idp.example.com/jwks"
"#;
    let (code, stderr) = check_config(&format!(
        r#"{base}
[[policy.rules]]
name = "a"
roles = ["admin"]

[[policy.rules]]
name = "a"
roles = []

[[policy.rules]]
name = "hours"
days = ["mon", "someday"]
hours = "17:00-09:00"
time_zone = "Europe/Atlantis"
"#
    ));
    assert_eq!(code, Some(2), "{stderr}");
    for want in [
        "policy.rules[0].roles: no issuer this rule applies to",
        "policy.rules[1].name",
        "policy.rules[1].roles",
        "policy.rules[2].days",
        "policy.rules[2].hours",
        "policy.rules[2].time_zone",
    ] {
        assert!(stderr.contains(want), "{want} not reported:\n{stderr}");
    }
    // Mapping roles makes the role rule possible.
    let (code, stderr) = check_config(&format!(
        "{base}[issuers.claims]\nroles = \"realm_access.roles\"\n\
         [[policy.rules]]\nname = \"a\"\nroles = [\"admin\"]\n"
    ));
    assert_eq!(code, Some(0), "{stderr}");
    // A claim path that does not parse names its option.
    let (code, stderr) = check_config(&format!("{base}[issuers.claims]\nroles = \"a..b\"\n"));
    assert_eq!(code, Some(2));
    assert!(stderr.contains("issuers[0].claims.roles"), "{stderr}");
}

/// A refusal's audit event names the rule and the condition, as the body does; a mistyped
/// option in a rule is a configuration error, never a rule without that requirement.
#[tokio::test]
async fn the_audit_event_names_the_rule_and_the_reason() {
    use std::io::Read;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let key = SigningKey::rsa_a("kid-a");
    let clerk = FakeClerk::start(vec![key.clone()]).await;
    let upstream = Upstream::start().await;
    let dir = TempDir::new("authz-audit");
    let cfg = dir.join("keygate.toml");
    std::fs::write(
        &cfg,
        clerk_config(
            &clerk.url(),
            clerk.secret_key(),
            &format!(
                "[log]\nformat = \"json\"\n[server]\ngrace_period_secs = 1\n\
                 shutdown_timeout_secs = 1\nthreads = 1\n{KEYS_MFA_RULE}"
            ),
        ),
    )
    .expect("config");
    let (port, admin) = (crate::common::free_port(), crate::common::free_port());
    let mut child = crate::common::keygate_command(&cfg, port, admin)
        .env("KEYGATE_UPSTREAM", upstream.url())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start keygate");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = client()
            .get(format!("http://127.0.0.1:{admin}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "keygate never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let session = key.sign(
        json!({"typ": "JWT"}),
        &keys::clerk_session_claims(&clerk.url(), "user_audit", "sess_audit"),
    );
    let resp = client()
        .post(format!("http://127.0.0.1:{port}/api/keys"))
        .bearer_auth(&session)
        .json(&json!({"apiKey": "k"}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 403);
    assert_eq!(upstream.count(), 0);
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "keygate did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut logs = String::new();
    for stream in [
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read>),
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut stream = stream;
        stream.read_to_string(&mut logs).expect("read");
    }
    let refusal = logs
        .lines()
        .find(|l| l.contains("\"target\":\"keygate::audit\"") && l.contains("\"event\":\"denied\""))
        .unwrap_or_else(|| panic!("no denied audit event:\n{logs}"));
    assert!(
        refusal.contains("\"rule\":\"key-writes-need-fresh-mfa\""),
        "{refusal}"
    );
    assert!(refusal.contains("\"reason\":\"mfa\""), "{refusal}");
    assert!(!logs.contains(&session), "the token was logged");

    // A typo in a rule (`role` for `roles`) is refused, naming it.
    let (code, stderr) = check_config(
        "[keys]\nenabled = false\n[clerk]\nfrontend_api_url = \"https://clerk.example.com\"\n\
         [[policy.rules]]\nname = \"x\"\nrole = [\"admin\"]\n",
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("role"), "{stderr}");
}

/// `[clerk.claims]` maps Clerk's tokens too (here an email a session-token template adds);
/// Clerk's own org and role claims keep working beside it.
#[tokio::test]
async fn clerk_claims_can_be_mapped_too() {
    let t = Authz::start(
        "",
        r#"
[clerk.claims]
email = "primary_email"

[auth]
session_token_paths = ["/api/keys", "/mcp"]

[[policy.rules]]
name = "company-admins-delete"
method = "tools/call"
call_name = "delete_*"
roles = ["admin"]
email_domains = ["company.com"]
"#,
    )
    .await;
    let session = |email: Value| t.clerk_session(json!({ "primary_email": email }));
    assert_eq!(
        t.call_tool(&session(json!("ana@company.com")), "delete_x")
            .await
            .0,
        200
    );
    let (status, body) = t
        .call_tool(&session(json!("ana@company.com.evil.io")), "delete_x")
        .await;
    assert_eq!(status, 403);
    assert_eq!(refusal(&body), ("company-admins-delete", "email_domain"));
    let (status, body) = t.call_tool(&session(Value::Null), "get_x").await;
    assert_eq!(status, 403);
    assert_eq!(refusal(&body), ("claims.email", "claim_missing"));
}
