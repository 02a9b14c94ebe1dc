// SPDX-License-Identifier: Apache-2.0
//! jwt_authn (+ claims-based RBAC) against Envoy: keys generated here, tokens minted here, filled
//! into `tests/scenarios/jwt_authn.tmpl.yaml`, then run as a differential scenario.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pingsail_tests::scenario::{Scenario, run_scenario, scenario_path};
use ring::rand::SystemRandom;
use ring::signature::{self, KeyPair};
use serde_json::{Value, json};
use std::collections::BTreeMap;

struct Key {
    kid: &'static str,
    enc: EncodingKey,
    jwk: Value,
}

fn b64u(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn ec(kid: &'static str, p384: bool) -> Key {
    let rng = SystemRandom::new();
    let (alg, crv, n) = if p384 {
        (&signature::ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48)
    } else {
        (&signature::ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32)
    };
    let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let pk = pair.public_key().as_ref();
    Key {
        kid,
        enc: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({"kty": "EC", "crv": crv, "kid": kid, "x": b64u(&pk[1..1 + n]), "y": b64u(&pk[1 + n..])}),
    }
}

fn ed(kid: &'static str) -> Key {
    let rng = SystemRandom::new();
    let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    Key {
        kid,
        enc: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64u(pair.public_key().as_ref())}),
    }
}

/// The test-only RSA key shipped with the filters' unit tests (ring cannot generate RSA keys).
fn rsa(kid: &'static str) -> Key {
    let data = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../filters/src/jwt/testdata/rsa2048.txt"
    ))
    .unwrap();
    let mut lines = data.lines().filter(|l| !l.starts_with('#'));
    let der = STANDARD.decode(lines.next().unwrap()).unwrap();
    let (n, e) = (lines.next().unwrap(), lines.next().unwrap());
    Key {
        kid,
        enc: EncodingKey::from_rsa_der(&der),
        jwk: json!({"kty": "RSA", "kid": kid, "n": n, "e": e}),
    }
}

fn mint(key: &Key, alg: Algorithm, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(key.kid.into());
    jsonwebtoken::encode(&h, claims, &key.enc).unwrap()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(sub: &str, extra: Value) -> Value {
    let mut c = json!({
        "iss": "https://issuer.example", "sub": sub, "exp": now() + 3600, "iat": now(),
        "aud": ["api.example"], "groups": ["admins", "x"], "scope": "read write",
        "nested": {"team": "blue"}, "n": 7,
    });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

/// A JWKS endpoint for `remote_jwks`: answers every request on every connection with `doc`.
async fn serve_jwks(doc: String) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let doc = doc.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{doc}",
                            doc.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_authn() {
    let (e256, e384, edk, rsak) = (ec("ec256", false), ec("ec384", true), ed("ed"), rsa("rsa"));
    let other = ec("ec256", false);
    let second = ec("second", false);
    let jwks = json!({"keys": [e256.jwk, e384.jwk, edk.jwk, rsak.jwk]}).to_string();
    let jwks2 = json!({"keys": [second.jwk]}).to_string();

    let mut t: BTreeMap<&str, String> = BTreeMap::new();
    t.insert(
        "es256",
        mint(&e256, Algorithm::ES256, &claims("alice", json!({}))),
    );
    t.insert(
        "es384",
        mint(&e384, Algorithm::ES384, &claims("carol", json!({}))),
    );
    t.insert(
        "eddsa",
        mint(
            &edk,
            Algorithm::EdDSA,
            &claims("bob", json!({"groups": ["users"], "aud": "nobody.example"})),
        ),
    );
    for (name, alg) in [
        ("rs256", Algorithm::RS256),
        ("rs384", Algorithm::RS384),
        ("rs512", Algorithm::RS512),
        ("ps256", Algorithm::PS256),
        ("ps384", Algorithm::PS384),
        ("ps512", Algorithm::PS512),
    ] {
        t.insert(name, mint(&rsak, alg, &claims("dave", json!({}))));
    }
    let es = |extra: Value| mint(&e256, Algorithm::ES256, &claims("alice", extra));
    t.insert("expired", es(json!({"exp": now() - 3600})));
    t.insert("within_skew", es(json!({"exp": now() - 30})));
    t.insert("not_yet_valid", es(json!({"nbf": now() + 3600})));
    t.insert("unknown_issuer", es(json!({"iss": "https://evil.example"})));
    t.insert("aud_url", es(json!({"aud": "https://api.example/"})));
    t.insert(
        "bad_signature",
        mint(&other, Algorithm::ES256, &claims("alice", json!({}))),
    );
    let nokid = Key {
        kid: "nope",
        ..ec("nope", false)
    };
    t.insert(
        "unknown_kid",
        mint(&nokid, Algorithm::ES256, &claims("alice", json!({}))),
    );
    t.insert(
        "second",
        mint(
            &second,
            Algorithm::ES256,
            &claims("erin", json!({"iss": "https://second.example"})),
        ),
    );
    let hs = Key {
        kid: "hs",
        enc: EncodingKey::from_secret(b"shared-secret"),
        jwk: json!({}),
    };
    t.insert(
        "hs256",
        mint(&hs, Algorithm::HS256, &claims("alice", json!({}))),
    );
    let payload = b64u(claims("alice", json!({})).to_string().as_bytes());
    t.insert(
        "alg_none",
        format!("{}.{payload}.", b64u(br#"{"alg":"none"}"#)),
    );
    t.insert(
        "alg_unknown",
        format!("{}.{payload}.c2ln", b64u(br#"{"alg":"XX999"}"#)),
    );
    let good = t["es256"].clone();
    let cut = good.rfind('.').unwrap();
    t.insert("bad_sig_b64", format!("{}.!!!", &good[..cut]));
    t.insert(
        "bad_payload",
        format!("{}.bm9wZQ.c2ln", b64u(br#"{"alg":"ES256","kid":"ec256"}"#)),
    );

    let jwks_port = serve_jwks(jwks.clone()).await;

    let path = scenario_path("jwt_authn.tmpl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text = text
        .replace("{{jwks}}", &jwks)
        .replace("{{jwks2}}", &jwks2)
        .replace("{{jwks_port}}", &jwks_port.to_string());
    for (name, token) in &t {
        text = text.replace(&format!("{{{{token.{name}}}}}"), token);
    }
    assert!(
        !text.contains("{{token."),
        "a token placeholder is not minted"
    );
    let scenario: Scenario = serde_yaml::from_str(&text).unwrap();
    if let Err(e) = run_scenario("jwt_authn", scenario).await {
        panic!("{e:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_claim_routing() {
    let key = ec("ec256", false);
    let other = ec("ec256", false);
    let jwks = json!({"keys": [key.jwk]}).to_string();
    let es = |extra: Value| mint(&key, Algorithm::ES256, &claims("alice", extra));
    let mut t: BTreeMap<&str, String> = BTreeMap::new();
    t.insert("blue", es(json!({"group": "blue", "groups": ["users"]})));
    t.insert("admins", es(json!({"group": "red"})));
    t.insert(
        "carol",
        es(json!({"sub": "carol", "groups": ["users"], "nested": {"team": "red"}})),
    );
    t.insert(
        "plain",
        es(json!({"groups": ["users"], "nested": {"team": "green"}})),
    );
    t.insert(
        "bad",
        mint(
            &other,
            Algorithm::ES256,
            &claims("alice", json!({"group": "blue"})),
        ),
    );
    let mut text = std::fs::read_to_string(scenario_path("jwt_routing.tmpl"))
        .unwrap()
        .replace("{{jwks}}", &jwks);
    for (name, token) in &t {
        text = text.replace(&format!("{{{{token.{name}}}}}"), token);
    }
    assert!(
        !text.contains("{{token."),
        "a token placeholder is not minted"
    );
    let scenario: Scenario = serde_yaml::from_str(&text).unwrap();
    if let Err(e) = run_scenario("jwt_routing", scenario).await {
        panic!("{e:#}");
    }
}
