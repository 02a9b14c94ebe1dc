// SPDX-License-Identifier: Apache-2.0
//! The agent's certificate configuration, read from pilot-agent's environment variables.
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `CA_ADDR` | CA `host:port` | `istiod.istio-system.svc:15012` (mesh discovery address) |
//! | `ISTIOD_SAN` | TLS name of the CA, when `CA_ADDR` is unset | host of the address |
//! | `CA_ROOT_CA` | PEM roots trusted for the CA (`SYSTEM` is not supported) | see below |
//! | `PILOT_CERT_PROVIDER` | `custom`: CA roots from `./etc/certs/root-cert.pem` | `istiod`: `./var/run/secrets/istio/root-cert.pem` |
//! | `CA_PROVIDER` | only `Citadel` (istiod) is implemented | `Citadel` |
//! | `JWT_POLICY` | `third-party-jwt`/`first-party-jwt`: bearer token from `./var/run/secrets/tokens/istio-token`; anything else: no token | `third-party-jwt` |
//! | `ISTIO_META_CLUSTER_ID` | `ClusterID` header | empty |
//! | `CA_HEADER_<NAME>` | extra header `<NAME>` sent to the CA | |
//! | `ISTIO_META_CERT_SIGNER` | `metadata.CertSigner` of the request | empty |
//! | `TRUST_DOMAIN`, `POD_NAMESPACE`, `SERVICE_ACCOUNT` | identity `spiffe://<td>/ns/<ns>/sa/<sa>` | `cluster.local`, required, required |
//! | `SECRET_TTL` | requested lifetime (Go duration) | `24h` |
//! | `SECRET_GRACE_PERIOD_RATIO` | rotate when this fraction of the lifetime is left | `0.5` |
//! | `SECRET_GRACE_PERIOD_RATIO_JITTER` | +- random spread of the ratio | `0.01` |
//! | `ECC_SIGNATURE_ALGORITHM` | `ECDSA` for an EC key; empty for RSA | empty (RSA, as pilot-agent) |
//! | `ECC_CURVE` | `P256` or `P384` | `P256` |
//! | `WORKLOAD_RSA_KEY_SIZE` | RSA modulus bits (>= 2048) | `2048` |
//! | `FILE_MOUNTED_CERTS` | `true`: serve `./etc/certs/{cert-chain,key,root-cert}.pem`, no CA | `false` |
//! | `FILE_DEBOUNCE_DURATION` | wait after a file change before reading | `100ms` |
//! | `OUTPUT_CERTS` | also write `key.pem`, `cert-chain.pem`, `root-cert.pem` to this directory | unset |
//! | `WORKLOAD_IDENTITY_SOCKET_FILE` | SDS socket file name in `./var/run/secrets/workload-spiffe-uds/` | `socket` |
//!
//! When `./var/run/secrets/workload-spiffe-credentials/{cert-chain,key,root-cert}.pem` all exist,
//! they are served instead of asking a CA (pilot-agent `initSdsServer`); so are
//! `./etc/certs/{cert-chain,key,root-cert}.pem` when all three exist (pilot-agent decides this per
//! resource: it would also serve a lone `./etc/certs/root-cert.pem` as `ROOTCA` next to a
//! CA-issued `default`; that mixed case is not reproduced). All `./` paths are relative to the
//! agent's working directory (`base` below).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::client::CaClientConfig;
use super::files::FileCertPaths;
use super::keys::{KeySpec, MIN_RSA_BITS};
use super::manager::{Backoff, RotationConfig};

/// Where the workload certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    Ca {
        client: Box<CaClientConfig>,
        rotation: Box<RotationConfig>,
    },
    Files {
        paths: FileCertPaths,
        poll: Duration,
        debounce: Duration,
    },
}

#[derive(Clone, Debug)]
pub struct CertConfig {
    pub source: CertSource,
    /// The SDS Unix socket.
    pub sds_socket: PathBuf,
    /// OUTPUT_CERTS: also write `key.pem`, `cert-chain.pem`, `root-cert.pem` here on every change.
    pub output_dir: Option<PathBuf>,
    /// Mode of the written files: 0644 inside Kubernetes (KUBERNETES_SERVICE_HOST set), else 0600.
    pub output_mode: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}={value:?}: {detail}")]
    Invalid {
        var: &'static str,
        value: String,
        detail: String,
    },
    #[error("{0} must be set to build the workload identity")]
    Missing(&'static str),
    #[error("{var}={value:?} is not supported by pingsail-agent ({detail})")]
    Unsupported {
        var: &'static str,
        value: String,
        detail: &'static str,
    },
}

pub const DEFAULT_CA_ADDR: &str = "istiod.istio-system.svc:15012";
pub const CA_ROOT_PATH: &str = "var/run/secrets/istio/root-cert.pem";
pub const TOKEN_PATH: &str = "var/run/secrets/tokens/istio-token";
pub const ETC_CERTS_DIR: &str = "etc/certs";
pub const WORKLOAD_CREDENTIALS_DIR: &str = "var/run/secrets/workload-spiffe-credentials";
pub const WORKLOAD_SOCKET_DIR: &str = "var/run/secrets/workload-spiffe-uds";
/// How often file-mounted certificates are checked for changes.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_millis(500);

impl CertConfig {
    /// Reads the configuration from `env` (the process environment, or a test's map); relative
    /// paths are resolved under `base` (the working directory).
    pub fn from_env(env: &BTreeMap<String, String>, base: &Path) -> Result<Self, ConfigError> {
        let get = |k: &str| env.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let output_dir = get("OUTPUT_CERTS").map(|d| base.join(d));
        let output_mode = if get("KUBERNETES_SERVICE_HOST").is_some() {
            0o644
        } else {
            0o600
        };
        let socket_file = get("WORKLOAD_IDENTITY_SOCKET_FILE").unwrap_or("socket");
        let sds_socket = base.join(WORKLOAD_SOCKET_DIR).join(socket_file);
        let debounce = match get("FILE_DEBOUNCE_DURATION") {
            Some(v) => parse_duration("FILE_DEBOUNCE_DURATION", v)?,
            None => Duration::from_millis(100),
        };
        let files = |paths: FileCertPaths| CertSource::Files {
            paths,
            poll: FILE_POLL_INTERVAL,
            debounce,
        };
        let workload_files = FileCertPaths::in_dir(base.join(WORKLOAD_CREDENTIALS_DIR));
        if workload_files.all_exist() {
            return Ok(Self {
                source: files(workload_files),
                sds_socket,
                output_dir,
                output_mode,
            });
        }
        let etc_certs = FileCertPaths::in_dir(base.join(ETC_CERTS_DIR));
        let file_mounted = match get("FILE_MOUNTED_CERTS") {
            Some(v) => parse_bool("FILE_MOUNTED_CERTS", v)?,
            None => false,
        };
        // pilot-agent serves `./etc/certs` files whenever they exist, FILE_MOUNTED_CERTS or not,
        // unless they are its own OUTPUT_CERTS (reading them back would never rotate).
        let is_output = output_dir
            .as_deref()
            .is_some_and(|o| same_dir(o, &base.join(ETC_CERTS_DIR)));
        if file_mounted || (etc_certs.all_exist() && !is_output) {
            return Ok(Self {
                source: files(etc_certs),
                sds_socket,
                output_dir,
                output_mode,
            });
        }

        if let Some(p) = get("CA_PROVIDER")
            && p != "Citadel"
        {
            return Err(ConfigError::Unsupported {
                var: "CA_PROVIDER",
                value: p.to_owned(),
                detail: "only Citadel (istiod) is implemented",
            });
        }
        let (address, server_name) = match get("CA_ADDR") {
            Some(a) => (a.to_owned(), None),
            None => (
                DEFAULT_CA_ADDR.to_owned(),
                get("ISTIOD_SAN").map(str::to_owned),
            ),
        };
        let root = match get("CA_ROOT_CA") {
            Some("SYSTEM") => {
                return Err(ConfigError::Unsupported {
                    var: "CA_ROOT_CA",
                    value: "SYSTEM".into(),
                    detail: "system roots are not loaded; give a PEM file",
                });
            }
            Some(path) => base.join(path),
            None if get("PILOT_CERT_PROVIDER") == Some("custom") => {
                base.join(ETC_CERTS_DIR).join("root-cert.pem")
            }
            None => base.join(CA_ROOT_PATH),
        };
        let token_path = match get("JWT_POLICY").unwrap_or("third-party-jwt") {
            "third-party-jwt" | "first-party-jwt" => Some(base.join(TOKEN_PATH)),
            _ => None,
        };
        let mut client = CaClientConfig::new(address, root);
        client.server_name = server_name;
        client.token_path = token_path;
        client.cluster_id = get("ISTIO_META_CLUSTER_ID").unwrap_or_default().to_owned();
        client.cert_signer = get("ISTIO_META_CERT_SIGNER").unwrap_or_default().to_owned();
        client.extra_headers = env
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("CA_HEADER_")
                    .filter(|n| !n.is_empty())
                    .map(|n| (n.to_owned(), v.clone()))
            })
            .collect();

        let trust_domain = get("TRUST_DOMAIN").unwrap_or("cluster.local");
        let ns = get("POD_NAMESPACE").ok_or(ConfigError::Missing("POD_NAMESPACE"))?;
        let sa = get("SERVICE_ACCOUNT").ok_or(ConfigError::Missing("SERVICE_ACCOUNT"))?;
        let identity = format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}");

        let ttl = match get("SECRET_TTL") {
            Some(v) => parse_duration("SECRET_TTL", v)?,
            None => Duration::from_secs(24 * 3600),
        };
        let grace_ratio = parse_f64(
            get("SECRET_GRACE_PERIOD_RATIO"),
            "SECRET_GRACE_PERIOD_RATIO",
            0.5,
        )?;
        let grace_jitter = parse_f64(
            get("SECRET_GRACE_PERIOD_RATIO_JITTER"),
            "SECRET_GRACE_PERIOD_RATIO_JITTER",
            0.01,
        )?;
        let key = key_spec(
            get("ECC_SIGNATURE_ALGORITHM"),
            get("ECC_CURVE"),
            get("WORKLOAD_RSA_KEY_SIZE"),
        )?;
        Ok(Self {
            source: CertSource::Ca {
                client: Box::new(client),
                rotation: Box::new(RotationConfig {
                    identity,
                    key,
                    ttl,
                    grace_ratio,
                    grace_jitter,
                    backoff: Backoff::default(),
                }),
            },
            sds_socket,
            output_dir,
            output_mode,
        })
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a.components().eq(b.components()),
    }
}

fn key_spec(
    alg: Option<&str>,
    curve: Option<&str>,
    rsa_bits: Option<&str>,
) -> Result<KeySpec, ConfigError> {
    match alg {
        None => {
            let bits = match rsa_bits {
                Some(v) => v.parse::<usize>().map_err(|e| ConfigError::Invalid {
                    var: "WORKLOAD_RSA_KEY_SIZE",
                    value: v.to_owned(),
                    detail: e.to_string(),
                })?,
                None => 2048,
            };
            if bits < MIN_RSA_BITS {
                return Err(ConfigError::Invalid {
                    var: "WORKLOAD_RSA_KEY_SIZE",
                    value: bits.to_string(),
                    detail: format!("below the minimum {MIN_RSA_BITS}"),
                });
            }
            Ok(KeySpec::Rsa { bits })
        }
        Some("ECDSA") => match curve.unwrap_or("P256") {
            "P384" => Ok(KeySpec::EcdsaP384),
            // pilot-agent falls back to P256 for any other curve name.
            _ => Ok(KeySpec::EcdsaP256),
        },
        Some(other) => Err(ConfigError::Invalid {
            var: "ECC_SIGNATURE_ALGORITHM",
            value: other.to_owned(),
            detail: "only ECDSA (or unset for RSA) is supported".into(),
        }),
    }
}

fn parse_f64(v: Option<&str>, var: &'static str, default: f64) -> Result<f64, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => s.parse::<f64>().map_err(|e| ConfigError::Invalid {
            var,
            value: s.to_owned(),
            detail: e.to_string(),
        }),
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_bool(var: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(ConfigError::Invalid {
            var,
            value: v.to_owned(),
            detail: "expected a boolean (true/false/1/0)".into(),
        }),
    }
}

/// Go's `time.ParseDuration` for non-negative values: `1h30m`, `90s`, `1.5h`, `500ms`, `0`.
pub fn parse_duration(var: &'static str, v: &str) -> Result<Duration, ConfigError> {
    let bad = |detail: &str| ConfigError::Invalid {
        var,
        value: v.to_owned(),
        detail: detail.to_owned(),
    };
    let s = v.strip_prefix('+').unwrap_or(v);
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return Err(bad(
            "expected a non-negative Go duration such as 24h or 90s",
        ));
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| bad("missing unit (ns, us, ms, s, m, h)"))?;
        if num_len == 0 {
            return Err(bad("expected a number"));
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| bad("bad number"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad("unknown unit (ns, us, ms, s, m, h)")),
        };
        total += n * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad("out of range"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn go_durations() {
        let d = |s| parse_duration("X", s).unwrap();
        assert_eq!(d("24h"), Duration::from_secs(86400));
        assert_eq!(d("1h30m"), Duration::from_secs(5400));
        assert_eq!(d("1.5h"), Duration::from_secs(5400));
        assert_eq!(d("500ms"), Duration::from_millis(500));
        assert_eq!(d("0"), Duration::ZERO);
        for bad in ["", "10", "-1s", "5x", "h"] {
            assert!(parse_duration("X", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn istio_defaults_from_injected_env() {
        let base = Path::new("/w");
        let cfg = CertConfig::from_env(
            &env(&[
                ("CA_ADDR", "istiod.istio-system.svc:15012"),
                ("POD_NAMESPACE", "default"),
                ("SERVICE_ACCOUNT", "sleep"),
                ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
                ("CA_HEADER_X-Tenant", "t1"),
                ("PILOT_CERT_PROVIDER", "istiod"),
            ]),
            base,
        )
        .unwrap();
        assert_eq!(
            cfg.sds_socket,
            Path::new("/w/var/run/secrets/workload-spiffe-uds/socket")
        );
        let CertSource::Ca { client, rotation } = cfg.source else {
            panic!("CA mode expected")
        };
        assert_eq!(client.address, "istiod.istio-system.svc:15012");
        assert_eq!(
            client.root_cert_path,
            Path::new("/w/var/run/secrets/istio/root-cert.pem")
        );
        assert_eq!(
            client.token_path.as_deref(),
            Some(Path::new("/w/var/run/secrets/tokens/istio-token"))
        );
        assert_eq!(client.cluster_id, "Kubernetes");
        assert_eq!(
            client.extra_headers,
            vec![("X-Tenant".to_string(), "t1".to_string())]
        );
        assert_eq!(
            rotation.identity,
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(rotation.key, KeySpec::Rsa { bits: 2048 });
        assert_eq!(rotation.ttl, Duration::from_secs(86400));
        assert_eq!(rotation.grace_ratio, 0.5);
        assert_eq!(rotation.grace_jitter, 0.01);
    }

    #[test]
    fn key_and_rotation_overrides() {
        let cfg = CertConfig::from_env(
            &env(&[
                ("POD_NAMESPACE", "ns"),
                ("SERVICE_ACCOUNT", "sa"),
                ("TRUST_DOMAIN", "example.org"),
                ("ECC_SIGNATURE_ALGORITHM", "ECDSA"),
                ("ECC_CURVE", "P384"),
                ("SECRET_TTL", "1h"),
                ("SECRET_GRACE_PERIOD_RATIO", "0.25"),
                ("JWT_POLICY", "none"),
                ("ISTIOD_SAN", "istiod.example"),
                ("WORKLOAD_IDENTITY_SOCKET_FILE", "test.sock"),
            ]),
            Path::new("/w"),
        )
        .unwrap();
        assert!(cfg.sds_socket.ends_with("workload-spiffe-uds/test.sock"));
        let CertSource::Ca { client, rotation } = cfg.source else {
            panic!("CA mode expected")
        };
        assert_eq!(client.address, DEFAULT_CA_ADDR);
        assert_eq!(client.server_name.as_deref(), Some("istiod.example"));
        assert_eq!(client.token_path, None);
        assert_eq!(rotation.identity, "spiffe://example.org/ns/ns/sa/sa");
        assert_eq!(rotation.key, KeySpec::EcdsaP384);
        assert_eq!(rotation.ttl, Duration::from_secs(3600));
        assert_eq!(rotation.grace_ratio, 0.25);
    }

    #[test]
    fn refusals_name_the_variable() {
        let base = Path::new("/w");
        let e = CertConfig::from_env(&env(&[("SERVICE_ACCOUNT", "sa")]), base).unwrap_err();
        assert!(e.to_string().contains("POD_NAMESPACE"), "{e}");
        let e = CertConfig::from_env(
            &env(&[
                ("POD_NAMESPACE", "n"),
                ("SERVICE_ACCOUNT", "s"),
                ("WORKLOAD_RSA_KEY_SIZE", "1024"),
            ]),
            base,
        )
        .unwrap_err();
        assert!(e.to_string().contains("WORKLOAD_RSA_KEY_SIZE"), "{e}");
        let e = CertConfig::from_env(
            &env(&[
                ("POD_NAMESPACE", "n"),
                ("SERVICE_ACCOUNT", "s"),
                ("SECRET_TTL", "soon"),
            ]),
            base,
        )
        .unwrap_err();
        assert!(e.to_string().contains("SECRET_TTL"), "{e}");
        let e = CertConfig::from_env(&env(&[("FILE_MOUNTED_CERTS", "yes")]), base).unwrap_err();
        assert!(e.to_string().contains("FILE_MOUNTED_CERTS"), "{e}");
    }

    #[test]
    fn existing_etc_certs_are_used_without_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("etc/certs");
        std::fs::create_dir_all(&certs).unwrap();
        for f in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
            std::fs::write(certs.join(f), "x").unwrap();
        }
        let cfg = CertConfig::from_env(&env(&[]), dir.path()).unwrap();
        assert!(matches!(cfg.source, CertSource::Files { .. }));
        // ... unless they are the agent's own output.
        let cfg = CertConfig::from_env(
            &env(&[
                ("OUTPUT_CERTS", "./etc/certs"),
                ("POD_NAMESPACE", "n"),
                ("SERVICE_ACCOUNT", "s"),
            ]),
            dir.path(),
        )
        .unwrap();
        assert!(matches!(cfg.source, CertSource::Ca { .. }));
        // The workload-spiffe-credentials directory wins.
        let wl = dir.path().join(WORKLOAD_CREDENTIALS_DIR);
        std::fs::create_dir_all(&wl).unwrap();
        for f in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
            std::fs::write(wl.join(f), "x").unwrap();
        }
        let cfg = CertConfig::from_env(&env(&[]), dir.path()).unwrap();
        let CertSource::Files { paths, .. } = cfg.source else {
            panic!("file mode expected")
        };
        assert_eq!(paths, FileCertPaths::in_dir(wl));
    }

    #[test]
    fn file_mounted_mode() {
        let cfg =
            CertConfig::from_env(&env(&[("FILE_MOUNTED_CERTS", "true")]), Path::new("/w")).unwrap();
        let CertSource::Files { paths, .. } = cfg.source else {
            panic!("file mode expected")
        };
        assert_eq!(paths, FileCertPaths::in_dir("/w/etc/certs"));
    }
}
