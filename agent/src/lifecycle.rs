// SPDX-License-Identifier: Apache-2.0
//! The agent's one lifecycle state, shared by everything that can end the pod's sidecar: the signal
//! handler (SIGTERM), the status server (`POST /quitquitquit`, `POST /drain`), and the supervisor that
//! owns the proxy process.
//!
//! The state only moves forward: `Running` → `Draining` → `Stopping`. Whoever moves it decides the
//! deadline or the exit code; everyone else watches ([`Lifecycle::subscribe`]) and acts:
//! - `Draining { deadline }`: the proxy has been asked to drain (admin `drain_listeners?graceful`);
//!   the agent exits at `deadline` (or earlier when EXIT_ON_ZERO_ACTIVE_CONNECTIONS says so);
//! - `Stopping { exit_code }`: the supervisor stops the proxy now and the agent exits with `exit_code`.

use std::time::Instant;

use tokio::sync::watch;

/// Where the agent is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Serving.
    Running,
    /// Draining until `deadline` (one deadline for the whole pod: terminationDrainDuration).
    Draining { deadline: Instant },
    /// Stop the proxy and exit now with this code.
    Stopping { exit_code: i32 },
}

/// The shared lifecycle: cheap to clone, every clone sees the same state.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    tx: watch::Sender<Phase>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(Phase::Running),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.tx.borrow()
    }

    /// A receiver that wakes on every phase change.
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.tx.subscribe()
    }

    /// Start draining with this deadline. Returns false (and changes nothing) when already draining
    /// or stopping: the first deadline is the only one.
    pub fn drain(&self, deadline: Instant) -> bool {
        self.tx.send_if_modified(|p| match p {
            Phase::Running => {
                *p = Phase::Draining { deadline };
                true
            }
            _ => false,
        })
    }

    /// Stop now with `exit_code`. Returns false when already stopping (the first code wins).
    pub fn stop(&self, exit_code: i32) -> bool {
        self.tx.send_if_modified(|p| match p {
            Phase::Stopping { .. } => false,
            _ => {
                *p = Phase::Stopping { exit_code };
                true
            }
        })
    }

    /// Wait until the phase is `Stopping` and return its exit code.
    pub async fn stopped(&self) -> i32 {
        let mut rx = self.subscribe();
        loop {
            if let Phase::Stopping { exit_code } = *rx.borrow_and_update() {
                return exit_code;
            }
            if rx.changed().await.is_err() {
                return 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::time::Duration;

    #[test]
    fn moves_forward_only_and_first_word_wins() {
        let l = Lifecycle::new();
        let d = Instant::now() + Duration::from_secs(5);
        assert!(l.drain(d));
        assert!(!l.drain(d + Duration::from_secs(1)));
        assert_eq!(l.phase(), Phase::Draining { deadline: d });
        assert!(l.stop(0));
        assert!(!l.stop(1));
        assert!(!l.drain(d));
        assert_eq!(l.phase(), Phase::Stopping { exit_code: 0 });
    }

    #[tokio::test]
    async fn stopped_wakes_on_stop() {
        let l = Lifecycle::new();
        let l2 = l.clone();
        let t = tokio::spawn(async move { l2.stopped().await });
        tokio::task::yield_now().await;
        l.stop(3);
        assert_eq!(t.await.unwrap(), 3);
    }
}
