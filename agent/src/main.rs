// SPDX-License-Identifier: Apache-2.0
//! pingsail-agent: the pilot-agent replacement. Each job is a subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod iptables;

#[derive(Parser)]
#[command(
    name = "pingsail-agent",
    version,
    about = "pingsail agent (pilot-agent replacement)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Set up the pod's traffic capture (istio-iptables / istio-init equivalent).
    Iptables(Box<iptables::Args>),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Iptables(args) => iptables::main(*args),
    }
}
