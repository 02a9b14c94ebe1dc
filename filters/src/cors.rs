// SPDX-License-Identifier: Apache-2.0
//! CORS (`envoy.filters.http.cors` with per-route / per-virtual-host `CorsPolicy`).

use crate::matcher::StringMatcher;

/// A validated `CorsPolicy`.
#[derive(Debug, Clone)]
pub struct CorsPolicy {
    /// `allow_origin_string_match`
    pub allow_origins: Vec<StringMatcher>,
    /// `allow_methods`
    pub allow_methods: Option<String>,
    /// `allow_headers`
    pub allow_headers: Option<String>,
    /// `expose_headers`
    pub expose_headers: Option<String>,
    /// `max_age`
    pub max_age: Option<String>,
    /// `allow_credentials`
    pub allow_credentials: bool,
    /// `filter_enabled` default (true when unset).
    pub enabled: bool,
    /// `allow_private_network_access`
    pub allow_private_network_access: bool,
}

/// What the CORS filter decides for a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not a CORS request, or origin not allowed: pass through untouched.
    PassThrough,
    /// A preflight from an allowed origin: answer locally with 200 and these headers.
    Preflight(Vec<(&'static str, String)>),
    /// An actual CORS request from an allowed origin: add these headers to the response.
    Decorate(Vec<(&'static str, String)>),
}

impl CorsPolicy {
    /// Is this origin allowed?
    pub fn allows(&self, origin: &str) -> bool {
        self.allow_origins.iter().any(|m| m.matches(origin))
    }

    /// Decides for a request with this method, `origin` and `access-control-request-method`.
    pub fn decide(&self, method: &str, origin: Option<&str>, acrm: Option<&str>) -> Decision {
        let Some(origin) = origin.filter(|o| !o.is_empty()) else {
            return Decision::PassThrough;
        };
        if !self.enabled || !self.allows(origin) {
            return Decision::PassThrough;
        }
        if method == "OPTIONS" && acrm.is_some_and(|m| !m.is_empty()) {
            let mut h = vec![("access-control-allow-origin", origin.to_string())];
            if self.allow_credentials {
                h.push(("access-control-allow-credentials", "true".into()));
            }
            if let Some(m) = &self.allow_methods {
                h.push(("access-control-allow-methods", m.clone()));
            }
            if let Some(m) = &self.allow_headers {
                h.push(("access-control-allow-headers", m.clone()));
            }
            if let Some(m) = &self.max_age {
                h.push(("access-control-max-age", m.clone()));
            }
            // Envoy 1.40 also sends expose-headers on the preflight answer.
            if let Some(e) = &self.expose_headers {
                h.push(("access-control-expose-headers", e.clone()));
            }
            return Decision::Preflight(h);
        }
        let mut h = vec![("access-control-allow-origin", origin.to_string())];
        if self.allow_credentials {
            h.push(("access-control-allow-credentials", "true".into()));
        }
        if let Some(e) = &self.expose_headers {
            h.push(("access-control-expose-headers", e.clone()));
        }
        Decision::Decorate(h)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::matcher::{StringMatch, StringMatcher};

    fn policy() -> CorsPolicy {
        CorsPolicy {
            allow_origins: vec![StringMatcher::new(
                StringMatch::Exact("https://a".into()),
                false,
            )],
            allow_methods: Some("GET,POST".into()),
            allow_headers: None,
            expose_headers: Some("x-exposed".into()),
            max_age: Some("60".into()),
            allow_credentials: true,
            enabled: true,
            allow_private_network_access: false,
        }
    }

    #[test]
    fn preflight_and_actual_requests() {
        let p = policy();
        let Decision::Preflight(h) = p.decide("OPTIONS", Some("https://a"), Some("POST")) else {
            panic!("expected a preflight answer");
        };
        assert!(h.contains(&("access-control-expose-headers", "x-exposed".into())));
        assert!(h.contains(&("access-control-max-age", "60".into())));
        assert_eq!(
            p.decide("OPTIONS", Some("https://b"), Some("POST")),
            Decision::PassThrough
        );
        assert!(matches!(
            p.decide("OPTIONS", Some("https://a"), None),
            Decision::Decorate(_)
        ));
        assert_eq!(p.decide("GET", None, None), Decision::PassThrough);
    }
}
