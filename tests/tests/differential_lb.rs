// SPDX-License-Identifier: Apache-2.0
//! Differential load-balancing scenarios (kept apart from differential.rs so that files stay small).

// Test code: panicking on a failed setup step is the point; timeouts here bound a test, not the data path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash() {
    if let Err(e) = pingsail_tests::scenario::run_named("consistent_hash").await {
        panic!("{e:#}");
    }
}
