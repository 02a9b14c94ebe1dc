// SPDX-License-Identifier: Apache-2.0
//! The workload certificate lifecycle (pilot-agent `SecretManagerClient`): generate a key and CSR,
//! have the CA sign it, validate the answer, publish it, and rotate when the grace period
//! starts; retry with exponential backoff while the CA is unreachable or answers badly. The
//! previous certificate stays published while a rotation is being retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use super::client::{CaClient, CaError};
use super::keys::{self, KeyError, KeySpec};
use super::pem::{self, CertError};
use crate::sds::{SecretSender, WorkloadSecret};

/// Rotation and retry policy.
#[derive(Clone, Debug)]
pub struct RotationConfig {
    /// The SPIFFE identity requested (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`).
    pub identity: String,
    pub key: KeySpec,
    /// Requested lifetime (SECRET_TTL, default 24h).
    pub ttl: Duration,
    /// Rotate when this fraction of the lifetime remains (SECRET_GRACE_PERIOD_RATIO, 0.5).
    pub grace_ratio: f64,
    /// Random +- spread on the ratio (SECRET_GRACE_PERIOD_RATIO_JITTER, 0.01).
    pub grace_jitter: f64,
    pub backoff: Backoff,
}

/// Exponential backoff with jitter (pilot-agent uses 500 ms initial, 60 s max, x1.5, +-50%).
#[derive(Clone, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// Fraction of random spread applied to each delay.
    pub randomization: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            multiplier: 1.5,
            randomization: 0.5,
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.initial.as_secs_f64() * self.multiplier.powi(attempt.min(64) as i32);
        let capped = base.min(self.max.as_secs_f64());
        let spread = capped * self.randomization.clamp(0.0, 1.0);
        let jittered = capped - spread + rand::random::<f64>() * 2.0 * spread;
        Duration::from_secs_f64(jittered.clamp(0.0, self.max.as_secs_f64()))
    }
}

/// Why one attempt to obtain a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("CA answer refused: {0}")]
    Chain(#[from] CertError),
}

/// One complete attempt: key, CSR, CA call, validation.
pub async fn fetch_once(
    client: &CaClient,
    cfg: &RotationConfig,
) -> Result<WorkloadSecret, FetchError> {
    let spec = cfg.key;
    let identity = cfg.identity.clone();
    // RSA generation takes a while; keep it off the async workers.
    let kc = tokio::task::spawn_blocking(move || keys::generate(spec, &identity))
        .await
        .map_err(|e| KeyError::Generate {
            spec,
            detail: e.to_string(),
        })??;
    let created = SystemTime::now();
    let answer = client.create_certificate(&kc.csr_pem, cfg.ttl).await?;
    let chain = pem::validate_issued_chain(&answer, &cfg.identity, &kc.spki, SystemTime::now())?;
    Ok(WorkloadSecret {
        cert_chain_pem: chain.chain_pem.into(),
        private_key_pem: kc.private_key_pem.into(),
        root_cert_pem: chain.root_pem.into(),
        not_after: chain.leaf.not_after,
        created,
    })
}

/// When to rotate `secret` (pilot-agent `rotateTime`): at `not_after - ratio * lifetime`, the
/// lifetime measured from when the agent obtained it, the ratio jittered and clamped to [0, 1].
pub fn rotation_delay(
    secret: &WorkloadSecret,
    ratio: f64,
    jitter: f64,
    now: SystemTime,
) -> Duration {
    let sign = if rand::random::<bool>() { 1.0 } else { -1.0 };
    let r = (ratio + rand::random::<f64>() * jitter * sign).clamp(0.0, 1.0);
    let lifetime = secret
        .not_after
        .duration_since(secret.created)
        .unwrap_or_default();
    let grace = lifetime.mul_f64(r);
    let rotate_at = secret
        .not_after
        .checked_sub(grace)
        .unwrap_or(secret.created);
    rotate_at.duration_since(now).unwrap_or_default()
}

/// Counters of the manager's activity.
#[derive(Debug, Default)]
pub struct ManagerStatus {
    pub attempts: AtomicU64,
    pub failures: AtomicU64,
    pub issued: AtomicU64,
    pub last_error: parking_lot::Mutex<Option<String>>,
}

impl ManagerStatus {
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }
}

/// A running certificate manager; stops when dropped.
pub struct CertManager {
    status: Arc<ManagerStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl CertManager {
    /// Starts obtaining and rotating certificates into `out`.
    pub fn spawn(client: CaClient, cfg: RotationConfig, out: SecretSender) -> Self {
        let status = Arc::new(ManagerStatus::default());
        let task = tokio::spawn(run(client, cfg, out, status.clone()));
        Self { status, task }
    }

    pub fn status(&self) -> &Arc<ManagerStatus> {
        &self.status
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(client: CaClient, cfg: RotationConfig, out: SecretSender, status: Arc<ManagerStatus>) {
    loop {
        let mut attempt = 0u32;
        let secret = loop {
            status.attempts.fetch_add(1, Ordering::Relaxed);
            match fetch_once(&client, &cfg).await {
                Ok(s) => break s,
                Err(e) => {
                    status.failures.fetch_add(1, Ordering::Relaxed);
                    let delay = cfg.backoff.delay(attempt);
                    tracing::warn!(error = %e, attempt, retry_in = ?delay, "workload certificate request failed");
                    *status.last_error.lock() = Some(e.to_string());
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep(delay).await;
                }
            }
        };
        let delay = rotation_delay(
            &secret,
            cfg.grace_ratio,
            cfg.grace_jitter,
            SystemTime::now(),
        );
        tracing::info!(identity = %cfg.identity, not_after = ?secret.not_after, rotate_in = ?delay, "workload certificate issued");
        status.issued.fetch_add(1, Ordering::Relaxed);
        out.send_replace(Some(Arc::new(secret)));
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn rotation_is_at_half_life_by_default() {
        let created = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = WorkloadSecret {
            cert_chain_pem: "".into(),
            private_key_pem: "".into(),
            root_cert_pem: "".into(),
            created,
            not_after: created + Duration::from_secs(24 * 3600),
        };
        assert_eq!(
            rotation_delay(&s, 0.5, 0.0, created),
            Duration::from_secs(12 * 3600)
        );
        // 1% jitter of 24h = at most 864 s either way.
        for _ in 0..50 {
            let d = rotation_delay(&s, 0.5, 0.01, created).as_secs_f64();
            assert!((d - 43200.0).abs() <= 864.0 + 1e-6, "{d}");
        }
        // Already past the rotation point: now.
        assert_eq!(
            rotation_delay(&s, 0.5, 0.0, created + Duration::from_secs(20 * 3600)),
            Duration::ZERO
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            randomization: 0.0,
        };
        assert_eq!(b.delay(0), Duration::from_millis(100));
        assert_eq!(b.delay(1), Duration::from_millis(200));
        assert_eq!(b.delay(3), Duration::from_millis(800));
        assert_eq!(b.delay(10), Duration::from_secs(1));
    }
}
