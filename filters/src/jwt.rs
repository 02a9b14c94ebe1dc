// SPDX-License-Identifier: Apache-2.0
//! JWT authentication with the semantics of Envoy's `envoy.filters.http.jwt_authn`: providers,
//! token locations, requirement trees, verification order and failure statuses, and what a
//! successful verification writes (forwarded payload, claim headers, dynamic metadata).
//!
//! Signatures are checked with `jsonwebtoken` (ring). Keys come from a JWKS given inline or read from
//! a file at configuration time.

use crate::metadata::{Struct, Value};
use crate::route::{RequestView, RouteMatch};
use base64::Engine as _;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};

/// The dynamic metadata namespace jwt_authn writes (`payload_in_metadata`).
pub const METADATA_NAMESPACE: &str = "envoy.filters.http.jwt_authn";

/// Why a token was refused (Envoy's `jwt_verify_lib` statuses we produce).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No token in any configured location.
    Missing,
    /// Not `header.payload.signature`.
    BadFormat,
    /// The header is not base64url.
    HeaderBadBase64,
    /// The header is not a JSON object.
    HeaderBadJson,
    /// `alg` missing or not a string.
    HeaderBadAlg,
    /// `alg` not implemented.
    HeaderAlgNotImplemented,
    /// The payload is not base64url.
    PayloadBadBase64,
    /// The payload is not a JSON object.
    PayloadBadJson,
    /// The signature is not base64url.
    SignatureBadBase64,
    /// `exp` in the past (beyond the clock skew).
    Expired,
    /// `nbf` in the future (beyond the clock skew).
    NotYetValid,
    /// `iss` does not name the provider's issuer (or no provider has it).
    UnknownIssuer,
    /// No audience in the token is allowed.
    AudienceNotAllowed,
    /// No key in the JWKS fits the token's `kid` / `alg`.
    KidAlgMismatch,
    /// The remote JWKS could not be fetched.
    JwksFetchFailed,
    /// The signature does not verify.
    VerificationFails,
}

impl Failure {
    /// HTTP status of the local reply.
    pub fn status(self) -> u16 {
        match self {
            Failure::AudienceNotAllowed => 403,
            _ => 401,
        }
    }

    /// Body of the local reply (the verifier's status message).
    pub fn message(self) -> &'static str {
        match self {
            Failure::Missing => "Jwt is missing",
            Failure::BadFormat => {
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
            }
            Failure::HeaderBadBase64 => "Jwt header is an invalid Base64url encoded",
            Failure::HeaderBadJson => "Jwt header is an invalid JSON",
            Failure::HeaderBadAlg => "Jwt header [alg] field is required and must be a string",
            Failure::HeaderAlgNotImplemented => "Jwt header [alg] is not supported",
            Failure::PayloadBadBase64 => "Jwt payload is an invalid Base64url encoded",
            Failure::PayloadBadJson => "Jwt payload is an invalid JSON",
            Failure::SignatureBadBase64 => "Jwt signature is an invalid Base64url encoded",
            Failure::Expired => "Jwt is expired",
            Failure::NotYetValid => "Jwt not yet valid",
            Failure::UnknownIssuer => "Jwt issuer is not configured",
            Failure::AudienceNotAllowed => "Audiences in Jwt are not allowed",
            Failure::KidAlgMismatch => "Jwks doesn't have key to match kid or alg from Jwt",
            Failure::JwksFetchFailed => "Jwks remote fetch is failed",
            Failure::VerificationFails => "Jwt verification fails",
        }
    }

    /// `%RESPONSE_CODE_DETAILS%`
    pub fn details(self) -> &'static str {
        "jwt_authn_access_denied"
    }
}

/// Where a provider looks for its token.
#[derive(Debug, Clone)]
pub enum Location {
    /// `from_headers`: header name and `value_prefix`.
    Header(http::HeaderName, String),
    /// `from_params`
    Param(String),
    /// `from_cookies`
    Cookie(String),
}

/// One verification key.
#[derive(Clone)]
pub struct Key {
    kid: Option<String>,
    /// `alg` of the JWK, when given.
    alg: Option<Algorithm>,
    family: Family,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("family", &self.family)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec256,
    Ec384,
    Ed25519,
    Hmac,
}

fn family_of(alg: Algorithm) -> Family {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Family::Rsa,
        Algorithm::ES256 => Family::Ec256,
        Algorithm::ES384 => Family::Ec384,
        Algorithm::EdDSA => Family::Ed25519,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
    }
}

/// Parses a JWKS document. Keys this verifier cannot use (P-521, unknown types) are skipped, as
/// Envoy skips keys it cannot parse; `Err` only when the document is not a JWKS at all.
pub fn parse_jwks(doc: &str) -> Result<Vec<Key>, String> {
    let v: serde_json::Value =
        serde_json::from_str(doc).map_err(|e| format!("invalid JWKS JSON: {e}"))?;
    let keys = v
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| "JWKS has no [keys] array".to_owned())?;
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(k.clone()) else {
            continue;
        };
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Family::Rsa,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => Family::Ec256,
                EllipticCurve::P384 => Family::Ec384,
                _ => continue,
            },
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                Family::Ed25519
            }
            AlgorithmParameters::OctetKeyPair(_) => continue,
            AlgorithmParameters::OctetKey(_) => Family::Hmac,
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let alg = k
            .get("alg")
            .and_then(|a| a.as_str())
            .and_then(|a| a.parse::<Algorithm>().ok());
        out.push(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            family,
            key,
        });
    }
    Ok(out)
}

/// A provider's key source.
#[derive(Debug, Clone)]
pub enum Jwks {
    /// `local_jwks`
    Local(Vec<Key>),
    /// `remote_jwks`, fetched by the proxy and cached here.
    Remote(std::sync::Arc<RemoteJwks>),
}

/// `remote_jwks`: where to fetch, and the cached keys.
#[derive(Debug)]
pub struct RemoteJwks {
    /// `http_uri.uri`
    pub uri: String,
    /// `http_uri.cluster`
    pub cluster: String,
    /// `http_uri.timeout`
    pub timeout: std::time::Duration,
    /// `cache_duration` (default 10 min)
    pub cache_duration: std::time::Duration,
    /// `retry_policy.num_retries` (0 without a retry policy)
    pub num_retries: u32,
    cache: parking_lot::RwLock<Option<(std::time::Instant, std::sync::Arc<Vec<Key>>)>>,
}

impl RemoteJwks {
    /// A source with an empty cache.
    pub fn new(
        uri: String,
        cluster: String,
        timeout: std::time::Duration,
        cache_duration: std::time::Duration,
        num_retries: u32,
    ) -> RemoteJwks {
        RemoteJwks {
            uri,
            cluster,
            timeout,
            cache_duration,
            num_retries,
            cache: parking_lot::RwLock::new(None),
        }
    }

    /// Keys fetched less than `cache_duration` ago.
    pub fn keys(&self, now: std::time::Instant) -> Option<std::sync::Arc<Vec<Key>>> {
        let c = self.cache.read();
        let (at, keys) = c.as_ref()?;
        (now.saturating_duration_since(*at) < self.cache_duration).then(|| keys.clone())
    }

    /// Caches a fetched JWKS document; `Err` if it is not a JWKS.
    pub fn store(&self, doc: &str, now: std::time::Instant) -> Result<(), String> {
        let keys = parse_jwks(doc)?;
        *self.cache.write() = Some((now, std::sync::Arc::new(keys)));
        Ok(())
    }

    /// The path-and-query of `uri` and its authority.
    pub fn target(&self) -> (&str, &str) {
        let rest = self
            .uri
            .split_once("://")
            .map_or(self.uri.as_str(), |(_, r)| r);
        match rest.find('/') {
            Some(i) => (&rest[i..], &rest[..i]),
            None => ("/", rest),
        }
    }
}

/// A compiled `JwtProvider`.
#[derive(Debug, Clone)]
pub struct Provider {
    /// The provider's name in `providers`.
    pub name: String,
    /// `issuer` (empty = any)
    pub issuer: String,
    /// `audiences` (empty = any)
    pub audiences: Vec<String>,
    /// Where the keys come from.
    pub jwks: Jwks,
    /// Token locations (the defaults when none are configured).
    pub locations: Vec<Location>,
    /// `forward`
    pub forward: bool,
    /// `forward_payload_header`
    pub forward_payload_header: Option<http::HeaderName>,
    /// `pad_forward_payload_header`
    pub pad_forward_payload_header: bool,
    /// `payload_in_metadata`
    pub payload_in_metadata: Option<String>,
    /// `normalize_payload_in_metadata.space_delimited_claims`
    pub space_delimited_claims: Vec<String>,
    /// `claim_to_headers`: header, claim path (split on '.').
    pub claim_to_headers: Vec<(http::HeaderName, Vec<String>)>,
    /// `clock_skew_seconds` (default 60)
    pub clock_skew: u64,
    /// `require_expiration`
    pub require_expiration: bool,
    /// `clear_route_cache`: the route is chosen again once a token of this provider verified
    /// (routes may match on the payload it wrote to dynamic metadata).
    pub clear_route_cache: bool,
    /// Tokens whose signature verified (Envoy's JWT cache, default 100 entries): the signature is
    /// not checked again; issuer, time and audience checks still run on every request.
    pub verified: std::sync::Arc<VerifiedCache>,
}

/// A bounded set of tokens (whole strings, not hashes) whose signature verified.
#[derive(Debug, Default)]
pub struct VerifiedCache(parking_lot::RwLock<std::collections::HashSet<Box<str>>>);

/// Entries kept before the cache is emptied and refilled.
const VERIFIED_CACHE_SIZE: usize = 100;

impl VerifiedCache {
    fn contains(&self, token: &str) -> bool {
        self.0.read().contains(token)
    }

    fn insert(&self, token: &str) {
        let mut set = self.0.write();
        if set.len() >= VERIFIED_CACHE_SIZE {
            set.clear();
        }
        set.insert(token.into());
    }

    /// Forgets everything (the keys changed).
    pub fn clear(&self) {
        self.0.write().clear();
    }
}

impl Provider {
    /// Envoy's default locations: `Authorization: Bearer <token>` and `?access_token=`.
    pub fn default_locations() -> Vec<Location> {
        vec![
            Location::Header(http::header::AUTHORIZATION, "Bearer ".into()),
            Location::Param("access_token".into()),
        ]
    }
}

/// A compiled `JwtRequirement`.
#[derive(Debug, Clone)]
pub enum Requirement {
    /// `provider_name` (index into providers)
    Provider(usize),
    /// `provider_and_audiences`
    ProviderAndAudiences(usize, Vec<String>),
    /// `requires_any`
    Any(Vec<Requirement>),
    /// `requires_all`
    All(Vec<Requirement>),
    /// `allow_missing`
    AllowMissing,
    /// `allow_missing_or_failed`
    AllowMissingOrFailed,
}

/// What a `RequirementRule` selects.
#[derive(Debug, Clone)]
pub enum RuleRequirement {
    /// `requires` (or nothing: no verification)
    Inline(Option<Requirement>),
    /// `requirement_name`
    Named(usize),
}

/// jwt_authn `PerRouteConfig`.
#[derive(Debug, Clone)]
pub enum PerRoute {
    /// `disabled: true`
    Disabled,
    /// `requirement_name`; a name missing from `requirement_map` means no verification (as Envoy).
    Requirement(String),
}

/// A compiled `JwtAuthentication`.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// `providers`, sorted by name.
    pub providers: Vec<Provider>,
    /// `rules`: the first whose match accepts the request decides.
    pub rules: Vec<(RouteMatch, RuleRequirement)>,
    /// `requirement_map` (name, requirement).
    pub requirement_map: Vec<(String, Requirement)>,
    /// `bypass_cors_preflight`
    pub bypass_cors_preflight: bool,
}

/// A verified token and what to do with it.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The provider (index) that verified it.
    pub provider: usize,
    /// Where it came from.
    pub location: Location,
    /// The raw base64url payload segment.
    pub payload_b64: String,
    /// The decoded payload.
    pub payload: serde_json::Map<String, serde_json::Value>,
}

/// The request facts verification reads.
pub struct TokenSource<'a> {
    /// Request headers.
    pub headers: &'a http::HeaderMap,
    /// The raw query (without '?').
    pub query: Option<&'a str>,
    /// Seconds since the epoch.
    pub now: u64,
}

/// Outcome of a requirement check.
pub type Outcome = Result<Vec<Verified>, Failure>;

impl JwtConfig {
    /// The requirement for this request: a per-route config wins; otherwise the first matching rule.
    /// `None` = nothing to verify.
    pub fn requirement<'a>(
        &'a self,
        per_route: Option<&PerRoute>,
        view: &RequestView<'_>,
    ) -> Option<&'a Requirement> {
        match per_route {
            Some(PerRoute::Disabled) => return None,
            Some(PerRoute::Requirement(n)) => {
                return self
                    .requirement_map
                    .iter()
                    .find(|(x, _)| x == n)
                    .map(|(_, r)| r);
            }
            None => {}
        }
        let (_, r) = self.rules.iter().find(|(m, _)| m.matches(view))?;
        match r {
            RuleRequirement::Inline(r) => r.as_ref(),
            RuleRequirement::Named(i) => self.requirement_map.get(*i).map(|(_, r)| r),
        }
    }

    /// Checks a requirement; `Ok` carries the tokens that verified.
    pub fn check(&self, req: &Requirement, src: &TokenSource<'_>) -> Outcome {
        match req {
            Requirement::Provider(i) => self.check_provider(*i, None, src),
            Requirement::ProviderAndAudiences(i, aud) => self.check_provider(*i, Some(aud), src),
            Requirement::AllowMissing | Requirement::AllowMissingOrFailed => {
                let found = self.check_any_provider(src);
                match found {
                    Ok(v) => Ok(v),
                    Err(Failure::Missing) => Ok(Vec::new()),
                    Err(_) if matches!(req, Requirement::AllowMissingOrFailed) => Ok(Vec::new()),
                    Err(f) => Err(f),
                }
            }
            Requirement::Any(children) => {
                let mut first_err = None;
                for c in children {
                    match self.check(c, src) {
                        Ok(v) => return Ok(v),
                        Err(Failure::Missing) => {}
                        Err(f) => {
                            first_err.get_or_insert(f);
                        }
                    }
                }
                Err(first_err.unwrap_or(Failure::Missing))
            }
            Requirement::All(children) => {
                let mut all = Vec::new();
                for c in children {
                    all.extend(self.check(c, src)?);
                }
                Ok(all)
            }
        }
    }

    fn check_provider(
        &self,
        i: usize,
        aud: Option<&Vec<String>>,
        src: &TokenSource<'_>,
    ) -> Outcome {
        let Some(p) = self.providers.get(i) else {
            return Err(Failure::Missing);
        };
        let Some((token, location)) = extract(&p.locations, src) else {
            return Err(Failure::Missing);
        };
        let (payload_b64, payload) = verify(p, aud, &token, src.now)?;
        Ok(vec![Verified {
            provider: i,
            location,
            payload_b64,
            payload,
        }])
    }

    /// `allow_missing`: a token in any provider's location, verified by the provider its `iss` names.
    fn check_any_provider(&self, src: &TokenSource<'_>) -> Outcome {
        let mut found = None;
        for p in &self.providers {
            if let Some(t) = extract(&p.locations, src) {
                found = Some(t);
                break;
            }
        }
        let Some((token, location)) = found else {
            return Err(Failure::Missing);
        };
        let parsed = parse(&token)?;
        let iss = parsed
            .payload
            .get("iss")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let Some(i) = self
            .providers
            .iter()
            .position(|p| p.issuer == iss)
            .or_else(|| self.providers.iter().position(|p| p.issuer.is_empty()))
        else {
            return Err(Failure::UnknownIssuer);
        };
        let (payload_b64, payload) = verify(&self.providers[i], None, &token, src.now)?;
        Ok(vec![Verified {
            provider: i,
            location,
            payload_b64,
            payload,
        }])
    }
}

/// Finds the first token in `locations`.
fn extract(locations: &[Location], src: &TokenSource<'_>) -> Option<(String, Location)> {
    for l in locations {
        let found = match l {
            Location::Header(name, prefix) => src
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    let after = if prefix.is_empty() {
                        0
                    } else {
                        v.find(prefix.as_str())? + prefix.len()
                    };
                    token_chars(&v[after..])
                }),
            Location::Param(name) => src.query.and_then(|q| {
                q.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k) == *name).then(|| percent_decode(v))
                })
            }),
            Location::Cookie(name) => src
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|c| {
                    let (k, v) = c.trim().split_once('=')?;
                    (k == name).then(|| v.trim_matches('"').to_owned())
                }),
        };
        if let Some(t) = found.filter(|t| !t.is_empty()) {
            return Some((t, l.clone()));
        }
    }
    None
}

/// The token after the prefix: leading spaces skipped, up to the next space or comma.
fn token_chars(v: &str) -> Option<String> {
    let rest = v.trim_start();
    let end = rest.find([' ', ',', '\t']).unwrap_or(rest.len());
    Some(rest[..end].to_owned())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

struct Parsed<'t> {
    alg: Algorithm,
    kid: Option<String>,
    payload_b64: &'t str,
    payload: serde_json::Map<String, serde_json::Value>,
    signing_input: &'t str,
    signature: &'t str,
}

fn b64(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD
        .decode(s)
        .ok()
        .or_else(|| URL_SAFE.decode(s).ok())
}

fn parse(token: &str) -> Result<Parsed<'_>, Failure> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Failure::BadFormat);
    };
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(Failure::BadFormat);
    }
    let header = b64(h).ok_or(Failure::HeaderBadBase64)?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|_| Failure::HeaderBadJson)?;
    let header = header.as_object().ok_or(Failure::HeaderBadJson)?;
    let alg = header
        .get("alg")
        .and_then(|a| a.as_str())
        .ok_or(Failure::HeaderBadAlg)?;
    let alg: Algorithm = alg.parse().map_err(|_| Failure::HeaderAlgNotImplemented)?;
    let kid = header
        .get("kid")
        .and_then(|k| k.as_str())
        .map(str::to_owned);
    let payload = b64(p).ok_or(Failure::PayloadBadBase64)?;
    let payload: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|_| Failure::PayloadBadJson)?;
    let serde_json::Value::Object(payload) = payload else {
        return Err(Failure::PayloadBadJson);
    };
    b64(s).ok_or(Failure::SignatureBadBase64)?;
    Ok(Parsed {
        alg,
        kid,
        payload_b64: p,
        payload,
        signing_input: &token[..h.len() + 1 + p.len()],
        signature: s,
    })
}

/// jwt_verify_lib compares audiences without the scheme and a trailing '/'.
fn normalize_aud(a: &str) -> &str {
    let a = a
        .strip_prefix("http://")
        .or_else(|| a.strip_prefix("https://"))
        .unwrap_or(a);
    a.strip_suffix('/').unwrap_or(a)
}

fn verify(
    p: &Provider,
    aud_override: Option<&Vec<String>>,
    token: &str,
    now: u64,
) -> Result<(String, serde_json::Map<String, serde_json::Value>), Failure> {
    let t = parse(token)?;
    // Issuer.
    let iss = t.payload.get("iss").and_then(|v| v.as_str()).unwrap_or("");
    if !p.issuer.is_empty() && iss != p.issuer {
        return Err(Failure::UnknownIssuer);
    }
    // Time constraints.
    let num = |k: &str| t.payload.get(k).and_then(|v| v.as_u64());
    if let Some(nbf) = num("nbf")
        && now + p.clock_skew < nbf
    {
        return Err(Failure::NotYetValid);
    }
    match num("exp") {
        Some(exp) if now > exp + p.clock_skew => return Err(Failure::Expired),
        None if p.require_expiration => return Err(Failure::Expired),
        _ => {}
    }
    // Audiences.
    let allowed = aud_override.unwrap_or(&p.audiences);
    if !allowed.is_empty() {
        let token_auds: Vec<&str> = match t.payload.get("aud") {
            Some(serde_json::Value::String(s)) => vec![s.as_str()],
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => vec![],
        };
        let ok = token_auds.iter().any(|ta| {
            allowed
                .iter()
                .any(|a| normalize_aud(a) == normalize_aud(ta))
        });
        if !ok {
            return Err(Failure::AudienceNotAllowed);
        }
    }
    // Key and signature.
    if p.verified.contains(token) {
        return Ok((t.payload_b64.to_owned(), t.payload));
    }
    let family = family_of(t.alg);
    let remote_keys;
    let keys: &[Key] = match &p.jwks {
        Jwks::Local(k) => k,
        Jwks::Remote(r) => {
            remote_keys = r
                .keys(std::time::Instant::now())
                .ok_or(Failure::JwksFetchFailed)?;
            &remote_keys
        }
    };
    let candidates = keys.iter().filter(|k| {
        k.family == family
            && k.alg.is_none_or(|a| a == t.alg)
            && (t.kid.is_none() || k.kid.is_none() || k.kid == t.kid)
    });
    let mut any = false;
    for k in candidates {
        any = true;
        if jsonwebtoken::crypto::verify(t.signature, t.signing_input.as_bytes(), &k.key, t.alg)
            .unwrap_or(false)
        {
            p.verified.insert(token);
            return Ok((t.payload_b64.to_owned(), t.payload));
        }
    }
    Err(if any {
        Failure::VerificationFails
    } else {
        Failure::KidAlgMismatch
    })
}

/// The payload as dynamic metadata, with `space_delimited_claims` split into lists.
pub fn payload_struct(
    payload: &serde_json::Map<String, serde_json::Value>,
    space_delimited: &[String],
) -> Struct {
    payload
        .iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) if space_delimited.iter().any(|c| c == k) => {
                    Value::List(
                        s.split(' ')
                            .filter(|p| !p.is_empty())
                            .map(|p| Value::String(p.to_owned()))
                            .collect(),
                    )
                }
                v => json_value(v),
            };
            (k.clone(), v)
        })
        .collect()
}

fn json_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => Value::Number(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Value::String(s.clone()),
        serde_json::Value::Array(a) => Value::List(a.iter().map(json_value).collect()),
        serde_json::Value::Object(o) => {
            Value::Struct(o.iter().map(|(k, v)| (k.clone(), json_value(v))).collect())
        }
    }
}

/// A claim rendered for `claim_to_headers`: strings as is, integers, booleans; others are skipped.
pub fn claim_header_value(
    payload: &serde_json::Map<String, serde_json::Value>,
    path: &[String],
) -> Option<String> {
    let (first, rest) = path.split_first()?;
    let mut v = payload.get(first)?;
    for k in rest {
        v = v.as_object()?.get(k)?;
    }
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(|i| i.to_string())
            .or_else(|| n.as_f64().map(|f| f.to_string())),
        _ => None,
    }
}

/// The query without the parameter `name`, re-serialised the way Envoy's jwt_authn does it when
/// it removes a token: parameters decoded, sorted by name, written as `k=v` without re-encoding
/// (so `%26` comes out as a raw `&`). `None` when nothing is left.
pub fn query_without(query: &str, name: &str) -> Option<String> {
    let mut params: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        params
            .entry(percent_decode(k))
            .or_default()
            .push(percent_decode(v));
    }
    params.remove(name);
    let out: Vec<String> = params
        .iter()
        .flat_map(|(k, vs)| vs.iter().map(move |v| format!("{k}={v}")))
        .collect();
    (!out.is_empty()).then(|| out.join("&"))
}

/// `forward_payload_header` value: the payload segment, padded on request.
pub fn forwarded_payload(v: &Verified, pad: bool) -> String {
    let mut s = v.payload_b64.clone();
    if pad {
        while !s.len().is_multiple_of(4) {
            s.push('=');
        }
    }
    s
}

#[cfg(test)]
mod tests;
