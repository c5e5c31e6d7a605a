//! Signing keys and token builders for the integration suite.
//!
//! The keys are fixed PEM fixtures (generated once with `openssl genpkey`, committed under
//! `tests/fixtures/`), so every token here carries a real RS256/ES256 signature. Besides honest
//! tokens this module builds the classic attack tokens (`alg: none`, HMAC keyed with the RSA
//! public key, a swapped payload) and the claim sets Clerk really issues.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

const RSA_A: &[u8] = include_bytes!("../../fixtures/rsa-a.pem");
const RSA_A_PUB: &[u8] = include_bytes!("../../fixtures/rsa-a.pub.pem");
const RSA_B: &[u8] = include_bytes!("../../fixtures/rsa-b.pem");
const RSA_B_PUB: &[u8] = include_bytes!("../../fixtures/rsa-b.pub.pem");
const EC_A: &[u8] = include_bytes!("../../fixtures/ec-a.pem");
const EC_A_PUB: &[u8] = include_bytes!("../../fixtures/ec-a.pub.pem");

/// `client_id` put into access tokens by [`access_token_claims`].
pub const TEST_CLIENT_ID: &str = "client_keygateTestClient";
/// `azp` put into session tokens by [`clerk_session_claims`].
pub const TEST_AZP: &str = "http://localhost:3000";

/// A private key with its `kid`, able to sign tokens and publish its public JWK.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    public_pem: &'static [u8],
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// RSA 2048 key "a", RS256.
    pub fn rsa_a(kid: &str) -> Self {
        Self::rsa(kid, RSA_A, RSA_A_PUB)
    }

    /// RSA 2048 key "b", RS256 (a second key for rotation and wrong-key tests).
    pub fn rsa_b(kid: &str) -> Self {
        Self::rsa(kid, RSA_B, RSA_B_PUB)
    }

    /// P-256 key "a", ES256.
    pub fn ec_a(kid: &str) -> Self {
        Self {
            kid: kid.to_owned(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_pem(EC_A).expect("ec-a.pem is a PKCS#8 P-256 key"),
            public_pem: EC_A_PUB,
        }
    }

    fn rsa(kid: &str, private: &[u8], public: &'static [u8]) -> Self {
        Self {
            kid: kid.to_owned(),
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_pem(private).expect("fixture is a PKCS#8 RSA key"),
            public_pem: public,
        }
    }

    /// The public key as a JWK with `kid`, `alg` and `"use": "sig"`, as Clerk publishes it.
    pub fn jwk(&self) -> Value {
        let jwk = Jwk::from_encoding_key(&self.encoding, self.alg).expect("public JWK from key");
        let mut value = serde_json::to_value(jwk).expect("JWK serializes");
        let obj = value.as_object_mut().expect("JWK is an object");
        obj.insert("kid".into(), json!(self.kid));
        obj.insert("alg".into(), json!(alg_name(self.alg)));
        obj.insert("use".into(), json!("sig"));
        value
    }

    /// The public key in SPKI PEM form (`-----BEGIN PUBLIC KEY-----`).
    pub fn public_pem(&self) -> &'static [u8] {
        self.public_pem
    }

    /// Sign `claims` with this key. The header starts as `{"alg", "kid", "typ": "JWT"}` and
    /// `header` is merged over it; a `null` value removes a field (`{"kid": null}` drops the kid).
    /// The signature always uses this key's real algorithm, even if `header` claims another.
    pub fn sign(&self, header: Value, claims: &Value) -> String {
        let mut merged = Map::new();
        merged.insert("alg".into(), json!(alg_name(self.alg)));
        merged.insert("kid".into(), json!(self.kid));
        merged.insert("typ".into(), json!("JWT"));
        merge(&mut merged, &header);
        sign_raw(&Value::Object(merged), claims, &self.encoding, self.alg)
    }
}

/// `{"keys": [...]}` for the given keys.
pub fn jwks(keys: &[&SigningKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
}

/// `b64url(header).b64url(claims).` with an empty signature (`alg: none` style).
pub fn unsigned_token(header: &Value, claims: &Value) -> String {
    format!("{}.{}.", b64_json(header), b64_json(claims))
}

/// An HS256 token keyed with an arbitrary `secret` (e.g. an RSA public PEM, for alg confusion).
/// The header is `{"alg": "HS256", "typ": "JWT"}` with `header_extra` merged over it (a `null`
/// value removes a field).
pub fn hs256_token(secret: &[u8], header_extra: &Value, claims: &Value) -> String {
    let mut header = Map::new();
    header.insert("alg".into(), json!("HS256"));
    header.insert("typ".into(), json!("JWT"));
    merge(&mut header, header_extra);
    let key = EncodingKey::from_secret(secret);
    sign_raw(&Value::Object(header), claims, &key, Algorithm::HS256)
}

/// Replace the payload of `token` with `claims`, keeping its header and (now stale) signature.
pub fn tamper_payload(token: &str, claims: &Value) -> String {
    let mut parts = token.split('.');
    let header = parts.next().expect("token has a header");
    let _payload = parts.next().expect("token has a payload");
    let signature = parts.next().expect("token has a signature");
    format!("{header}.{}.{signature}", b64_json(claims))
}

/// Decode the (unverified) payload of a compact JWS, for assertions in tests.
pub fn payload_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("token has a payload");
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .expect("payload is base64url");
    serde_json::from_slice(&bytes).expect("payload is JSON")
}

/// Current Unix time in seconds.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Current Unix time in milliseconds (the unit of Clerk's Backend API timestamps).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// A unique lowercase hex string of `len` characters (at most 64), for ids and tokens.
pub fn unique_hex(len: usize) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = Sha256::new();
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.update(now_ms().to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    hex[..len.min(64)].to_owned()
}

/// Claims of a Clerk session token, version 2 (60 s life, org claims under `o`).
pub fn clerk_session_claims(iss: &str, sub: &str, sid: &str) -> Value {
    let now = now();
    json!({
        "sub": sub,
        "sid": sid,
        "iss": iss,
        "exp": now + 60,
        "nbf": now - 5,
        "iat": now,
        "azp": TEST_AZP,
        "sts": "active",
        "v": 2,
        "o": { "id": "org_keygateTestOrg", "slg": "keygate-test", "rol": "admin",
               "per": "read,write", "fpm": "3" },
    })
}

/// Claims of a Clerk OAuth access token in JWT form (sign with header `{"typ": "at+jwt"}`).
/// `aud` is present only when the client asked for a resource (RFC 8707).
pub fn access_token_claims(iss: &str, sub: &str, aud: Option<&str>, scope: &str) -> Value {
    let now = now();
    let mut claims = json!({
        "sub": sub,
        "client_id": TEST_CLIENT_ID,
        "scope": scope,
        "jti": format!("oat_{}", unique_hex(32)),
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "iss": iss,
    });
    if let Some(aud) = aud {
        claims["aud"] = json!(aud);
    }
    claims
}

/// Merge the fields of `extra` (an object; anything else is ignored) into `into`;
/// `null` values remove the field instead.
fn merge(into: &mut Map<String, Value>, extra: &Value) {
    for (k, v) in extra.as_object().into_iter().flatten() {
        if v.is_null() {
            into.remove(k);
        } else {
            into.insert(k.clone(), v.clone());
        }
    }
}

fn sign_raw(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!("{}.{}", b64_json(header), b64_json(claims));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).expect("sign");
    format!("{message}.{signature}")
}

fn b64_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("JSON serializes"))
}

fn alg_name(alg: Algorithm) -> String {
    serde_json::to_value(alg)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .expect("algorithm has a name")
}
