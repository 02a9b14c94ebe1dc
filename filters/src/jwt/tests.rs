// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use jsonwebtoken::{EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{self, KeyPair};

const NOW: u64 = 1_900_000_000;

struct Signer {
    alg: Algorithm,
    kid: &'static str,
    key: EncodingKey,
    jwk: serde_json::Value,
}

fn b64u(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn es256() -> Signer {
    let rng = SystemRandom::new();
    let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let pk = pair.public_key().as_ref();
    Signer {
        alg: Algorithm::ES256,
        kid: "ec",
        key: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: serde_json::json!({"kty":"EC","crv":"P-256","kid":"ec","alg":"ES256",
            "x": b64u(&pk[1..33]), "y": b64u(&pk[33..65])}),
    }
}

fn eddsa() -> Signer {
    let rng = SystemRandom::new();
    let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    Signer {
        alg: Algorithm::EdDSA,
        kid: "ed",
        key: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: serde_json::json!({"kty":"OKP","crv":"Ed25519","kid":"ed",
            "x": b64u(pair.public_key().as_ref())}),
    }
}

fn rsa(alg: Algorithm) -> Signer {
    let data = include_str!("testdata/rsa2048.txt");
    let mut lines = data.lines().filter(|l| !l.starts_with('#'));
    let der = base64::engine::general_purpose::STANDARD
        .decode(lines.next().unwrap())
        .unwrap();
    let (n, e) = (lines.next().unwrap(), lines.next().unwrap());
    Signer {
        alg,
        kid: "rsa",
        key: EncodingKey::from_rsa_der(&der),
        jwk: serde_json::json!({"kty":"RSA","kid":"rsa","n": n, "e": e}),
    }
}

impl Signer {
    fn mint(&self, claims: serde_json::Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.into());
        jsonwebtoken::encode(&h, &claims, &self.key).unwrap()
    }
}

fn provider(signers: &[&Signer]) -> Provider {
    let jwks =
        serde_json::json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()});
    Provider {
        name: "origins-0".into(),
        issuer: "https://issuer.example".into(),
        audiences: vec![],
        jwks: Jwks::Local(parse_jwks(&jwks.to_string()).unwrap()),
        locations: Provider::default_locations(),
        forward: false,
        forward_payload_header: None,
        pad_forward_payload_header: false,
        payload_in_metadata: Some("payload".into()),
        space_delimited_claims: vec!["scope".into()],
        claim_to_headers: vec![],
        clock_skew: 60,
        require_expiration: false,
        clear_route_cache: false,
        verified: Default::default(),
    }
}

fn config(p: Provider) -> JwtConfig {
    JwtConfig {
        providers: vec![p],
        rules: vec![],
        requirement_map: vec![],
        bypass_cors_preflight: true,
    }
}

fn bearer(token: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    h
}

fn check(
    cfg: &JwtConfig,
    req: &Requirement,
    headers: &http::HeaderMap,
    query: Option<&str>,
) -> Outcome {
    cfg.check(
        req,
        &TokenSource {
            headers,
            query,
            now: NOW,
        },
    )
}

fn good_claims() -> serde_json::Value {
    serde_json::json!({"iss": "https://issuer.example", "sub": "alice", "exp": NOW + 3600,
        "aud": ["https://api.example/"], "scope": "read write", "nested": {"team": "blue"}, "n": 7})
}

#[test]
fn every_algorithm_verifies() {
    let signers = [
        es256(),
        eddsa(),
        rsa(Algorithm::RS256),
        rsa(Algorithm::RS384),
        rsa(Algorithm::RS512),
        rsa(Algorithm::PS256),
        rsa(Algorithm::PS384),
        rsa(Algorithm::PS512),
    ];
    let cfg = config(provider(&signers.iter().collect::<Vec<_>>()));
    for s in &signers {
        let t = s.mint(good_claims());
        let v = check(&cfg, &Requirement::Provider(0), &bearer(&t), None)
            .unwrap_or_else(|f| panic!("{:?}: {f:?}", s.alg));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].payload["sub"], "alice");
    }
}

#[test]
fn failures_in_envoy_order() {
    let ec = es256();
    let other = es256();
    let mut p = provider(&[&ec]);
    p.audiences = vec!["api.example".into()];
    let cfg = config(p);
    let req = Requirement::Provider(0);
    let run =
        |claims: serde_json::Value, s: &Signer| check(&cfg, &req, &bearer(&s.mint(claims)), None);
    assert!(run(good_claims(), &ec).is_ok());
    let mut c = good_claims();
    c["exp"] = (NOW - 61).into();
    assert_eq!(run(c.clone(), &ec).unwrap_err(), Failure::Expired);
    c["exp"] = (NOW - 59).into();
    assert!(run(c, &ec).is_ok(), "within the clock skew");
    let mut c = good_claims();
    c["nbf"] = (NOW + 120).into();
    assert_eq!(run(c, &ec).unwrap_err(), Failure::NotYetValid);
    let mut c = good_claims();
    c["iss"] = "https://other".into();
    c["exp"] = (NOW - 1000).into();
    assert_eq!(run(c, &ec).unwrap_err(), Failure::UnknownIssuer);
    let mut c = good_claims();
    c["aud"] = "nope".into();
    assert_eq!(run(c, &ec).unwrap_err(), Failure::AudienceNotAllowed);
    assert_eq!(
        run(good_claims(), &other).unwrap_err(),
        Failure::VerificationFails
    );
    assert_eq!(
        run(good_claims(), &eddsa()).unwrap_err(),
        Failure::KidAlgMismatch
    );
    let bad = |t: &str| check(&cfg, &req, &bearer(t), None).unwrap_err();
    assert_eq!(bad("abc"), Failure::BadFormat);
    assert_eq!(bad("a.b.c.d"), Failure::BadFormat);
    assert_eq!(bad("e30.e30.sig"), Failure::HeaderBadAlg);
    assert_eq!(bad("bm90anNvbg.e30.sig"), Failure::HeaderBadJson);
    let h = b64u(br#"{"alg":"none"}"#);
    assert_eq!(
        bad(&format!("{h}.e30.sig")),
        Failure::HeaderAlgNotImplemented
    );
    let h = b64u(br#"{"alg":"ES256"}"#);
    assert_eq!(bad(&format!("{h}.bm9wZQ.sig")), Failure::PayloadBadJson);
    // Missing: no header, a lower-case prefix.
    assert_eq!(
        check(&cfg, &req, &http::HeaderMap::new(), None).unwrap_err(),
        Failure::Missing
    );
    let mut h = http::HeaderMap::new();
    h.insert(
        "authorization",
        format!("bearer {}", ec.mint(good_claims()))
            .parse()
            .unwrap(),
    );
    assert_eq!(check(&cfg, &req, &h, None).unwrap_err(), Failure::Missing);
    // The default query parameter.
    let q = format!("x=1&access_token={}", ec.mint(good_claims()));
    assert!(check(&cfg, &req, &http::HeaderMap::new(), Some(&q)).is_ok());
}

#[test]
fn istio_requirement_shape() {
    let ec = es256();
    let cfg = config(provider(&[&ec]));
    // requires_any [provider, allow_missing], as istiod compiles one RequestAuthentication rule.
    let req = Requirement::Any(vec![Requirement::Provider(0), Requirement::AllowMissing]);
    assert!(
        check(&cfg, &req, &http::HeaderMap::new(), None)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        check(&cfg, &req, &bearer(&ec.mint(good_claims())), None)
            .unwrap()
            .len(),
        1
    );
    let mut c = good_claims();
    c["exp"] = (NOW - 1000).into();
    assert_eq!(
        check(&cfg, &req, &bearer(&ec.mint(c.clone())), None).unwrap_err(),
        Failure::Expired
    );
    let lenient = Requirement::AllowMissingOrFailed;
    assert!(
        check(&cfg, &lenient, &bearer(&ec.mint(c)), None)
            .unwrap()
            .is_empty()
    );
    let all = Requirement::All(vec![Requirement::Provider(0), Requirement::AllowMissing]);
    assert_eq!(
        check(&cfg, &all, &http::HeaderMap::new(), None).unwrap_err(),
        Failure::Missing
    );
}

#[test]
fn payload_outputs() {
    let ec = es256();
    let cfg = config(provider(&[&ec]));
    let v = check(
        &cfg,
        &Requirement::Provider(0),
        &bearer(&ec.mint(good_claims())),
        None,
    )
    .unwrap();
    let s = payload_struct(&v[0].payload, &cfg.providers[0].space_delimited_claims);
    assert_eq!(
        s["scope"],
        Value::List(vec![
            Value::String("read".into()),
            Value::String("write".into())
        ])
    );
    assert_eq!(
        claim_header_value(&v[0].payload, &["nested".into(), "team".into()]).as_deref(),
        Some("blue")
    );
    assert_eq!(
        claim_header_value(&v[0].payload, &["n".into()]).as_deref(),
        Some("7")
    );
    assert_eq!(claim_header_value(&v[0].payload, &["aud".into()]), None);
    let fwd = forwarded_payload(&v[0], true);
    assert_eq!(fwd.len() % 4, 0);
}

#[test]
fn custom_locations() {
    let ec = es256();
    let mut p = provider(&[&ec]);
    p.locations = vec![
        Location::Header(http::HeaderName::from_static("x-jwt"), "Token ".into()),
        Location::Cookie("session".into()),
    ];
    let cfg = config(p);
    let t = ec.mint(good_claims());
    let mut h = http::HeaderMap::new();
    h.insert("x-jwt", format!("Token {t}").parse().unwrap());
    assert!(check(&cfg, &Requirement::Provider(0), &h, None).is_ok());
    let mut h = http::HeaderMap::new();
    h.insert("cookie", format!("a=b; session={t}").parse().unwrap());
    assert!(check(&cfg, &Requirement::Provider(0), &h, None).is_ok());
    // The default locations are not consulted once locations are configured.
    assert_eq!(
        check(&cfg, &Requirement::Provider(0), &bearer(&t), None).unwrap_err(),
        Failure::Missing
    );
}

#[test]
fn remote_jwks_cache() {
    let ec = es256();
    let r = std::sync::Arc::new(RemoteJwks::new(
        "http://jwks.example:8080/keys?x=1".into(),
        "outbound|8080||jwks.example".into(),
        std::time::Duration::from_secs(5),
        std::time::Duration::from_secs(300),
        0,
    ));
    assert_eq!(r.target(), ("/keys?x=1", "jwks.example:8080"));
    let mut p = provider(&[&ec]);
    p.jwks = Jwks::Remote(r.clone());
    let cfg = config(p);
    let token = ec.mint(good_claims());
    let req = Requirement::Provider(0);
    assert_eq!(
        check(&cfg, &req, &bearer(&token), None).unwrap_err(),
        Failure::JwksFetchFailed
    );
    let doc = serde_json::json!({"keys": [ec.jwk.clone()]}).to_string();
    r.store(&doc, std::time::Instant::now()).unwrap();
    assert!(check(&cfg, &req, &bearer(&token), None).is_ok());
    // A cached token still goes through the time checks.
    let mut expired = good_claims();
    expired["exp"] = (NOW - 1000).into();
    let old = ec.mint(expired);
    assert_eq!(
        cfg.check(
            &req,
            &TokenSource {
                headers: &bearer(&old),
                query: None,
                now: NOW - 2000
            }
        )
        .map(|v| v.len()),
        Ok(1)
    );
    assert_eq!(
        check(&cfg, &req, &bearer(&old), None).unwrap_err(),
        Failure::Expired
    );
    let later = std::time::Instant::now() + std::time::Duration::from_secs(301);
    assert!(r.keys(later).is_none(), "expired after cache_duration");
    assert!(r.store("not json", later).is_err());
}
