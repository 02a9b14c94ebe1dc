// SPDX-License-Identifier: Apache-2.0
//! Placeholder binary: this component is specified but not built yet. It refuses to run rather than
//! pretend to work.

fn main() {
    eprintln!("pingsail-agent: not implemented yet (see the open issue for the agent)");
    std::process::exit(2);
}
