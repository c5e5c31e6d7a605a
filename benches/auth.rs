//! The authentication hot path: RS256 and ES256 verification of a token seen for the first
//! time, and the verified-token cache hit every later request of that token takes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keygate::auth::jwks::JwksCache;
use keygate::auth::jwt::JwtIssuer;
use keygate::auth::Authenticator;
use keygate::config::JwksSettings;

const ISSUER: &str = "https://issuer.bench.example";
const AUDIENCE: &str = "https://mcp.bench.example/mcp";

fn jwks_settings() -> JwksSettings {
    JwksSettings {
        refresh_interval: Duration::from_secs(300),
        unknown_kid_cooldown: Duration::from_secs(30),
        max_stale: Duration::from_secs(86_400),
        fetch_timeout: Duration::from_secs(5),
        max_bytes: 65_536,
        max_keys: 32,
    }
}

struct Fixture {
    token: String,
    jwks_path: PathBuf,
}

fn fixture(alg: Algorithm, pem: &[u8], name: &str) -> Fixture {
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem),
        _ => EncodingKey::from_rsa_pem(pem),
    }
    .expect("bench key");
    let mut jwk = Jwk::from_encoding_key(&key, alg).expect("jwk");
    jwk.common.key_id = Some(name.to_string());
    let path =
        std::env::temp_dir().join(format!("keygate-bench-{name}-{}.json", std::process::id()));
    std::fs::write(&path, serde_json::json!({ "keys": [jwk] }).to_string()).expect("jwks");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mut header = Header::new(alg);
    header.typ = Some("at+jwt".into());
    header.kid = Some(name.to_string());
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": "user_bench", "aud": AUDIENCE, "scope": "twenty:read",
        "iat": now, "nbf": now, "exp": now + 3600, "client_id": "bench",
    });
    Fixture {
        token: jsonwebtoken::encode(&header, &claims, &key).expect("sign"),
        jwks_path: path,
    }
}

fn issuer(rt: &tokio::runtime::Runtime, f: &Fixture, alg: Algorithm) -> JwtIssuer {
    let cache = Arc::new(JwksCache::from_file(
        ISSUER,
        f.jwks_path.clone(),
        vec![alg],
        &jwks_settings(),
        reqwest::Client::new(),
    ));
    rt.block_on(cache.refresh()).expect("load jwks");
    JwtIssuer::new(
        ISSUER,
        cache,
        vec![AUDIENCE.into()],
        &[alg],
        Duration::from_secs(5),
        None,
        Default::default(),
    )
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rsa = fixture(
        Algorithm::RS256,
        include_bytes!("../config/dev/signing-key.pem"),
        "rs",
    );
    let ec = fixture(
        Algorithm::ES256,
        include_bytes!("fixtures/ec-p256.pem"),
        "es",
    );

    let rs_issuer = issuer(&rt, &rsa, Algorithm::RS256);
    c.bench_function("verify RS256 (uncached)", |b| {
        b.iter(|| rt.block_on(rs_issuer.verify(&rsa.token)).expect("valid"))
    });
    let es_issuer = issuer(&rt, &ec, Algorithm::ES256);
    c.bench_function("verify ES256 (uncached)", |b| {
        b.iter(|| rt.block_on(es_issuer.verify(&ec.token)).expect("valid"))
    });

    let toml = format!(
        "[resource]\nurl = \"{AUDIENCE}\"\n[keys]\nenabled = false\n[[issuers]]\nissuer = \"{ISSUER}\"\njwks_file = \"{}\"\n",
        rsa.jwks_path.display()
    );
    let cfg = std::env::temp_dir().join(format!("keygate-bench-{}.toml", std::process::id()));
    std::fs::write(&cfg, toml).expect("config");
    let env = std::collections::HashMap::<String, String>::new();
    let configured = keygate::app::configure(Some(&cfg), &env).expect("bench config");
    // Read once at load and refresh below; nothing of them is needed afterwards.
    let _ = std::fs::remove_file(&cfg);
    let auth = Authenticator::new(&configured.settings, reqwest::Client::new());
    for cache in auth.key_sets() {
        rt.block_on(cache.refresh()).expect("load jwks");
    }
    rt.block_on(auth.authenticate(&rsa.token, false))
        .expect("warm");
    let _ = std::fs::remove_file(&rsa.jwks_path);
    let _ = std::fs::remove_file(&ec.jwks_path);
    c.bench_function("authenticate RS256 (verified-cache hit)", |b| {
        b.iter(|| {
            rt.block_on(auth.authenticate(&rsa.token, false))
                .expect("valid")
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
