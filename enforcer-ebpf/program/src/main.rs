//! The datapath program. Built for `bpfel-unknown-none` by the loader's build script; on the
//! host it is an empty binary, so the workspace's checks and tests build everywhere.

#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod datapath;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
