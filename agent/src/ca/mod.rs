// SPDX-License-Identifier: Apache-2.0
//! The workload certificate side of pilot-agent: a key and CSR for the pod's SPIFFE identity,
//! signed by istiod's CA (`IstioCertificateService/CreateCertificate`), validated, rotated before
//! expiry; or certificates mounted as files, reloaded on change. The result is published on a
//! [`crate::sds::SecretSender`] for the SDS server.
//!
//! [`config::CertConfig::from_env`] reads the same environment as pilot-agent (see its docs).

pub mod client;
pub mod config;
pub mod dev;
pub mod files;
pub mod keys;
pub mod manager;
pub mod pem;
pub mod proto;

pub use client::{CaClient, CaClientConfig, CaError};
pub use config::{CertConfig, CertSource, ConfigError};
pub use files::{FileCertPaths, FileWatcher};
pub use keys::KeySpec;
pub use manager::{Backoff, CertManager, FetchError, RotationConfig, fetch_once};

/// Whatever keeps the secret channel fed; stops when dropped.
pub enum Provider {
    Ca(CertManager),
    Files(FileWatcher),
}

/// Starts the provider `cfg` selects, publishing into `out`.
pub fn start(cfg: &CertConfig, out: crate::sds::SecretSender) -> Provider {
    match &cfg.source {
        CertSource::Ca { client, rotation } => Provider::Ca(CertManager::spawn(
            CaClient::new((**client).clone()),
            (**rotation).clone(),
            out,
        )),
        CertSource::Files {
            paths,
            poll,
            debounce,
        } => Provider::Files(FileWatcher::spawn(paths.clone(), *poll, *debounce, out)),
    }
}
