// SPDX-License-Identifier: Apache-2.0
//! Differential load-balancing scenarios (kept apart from differential.rs so that files stay small).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash() {
    if let Err(e) = pingsail_tests::scenario::run_named("consistent_hash").await {
        panic!("{e:#}");
    }
}
