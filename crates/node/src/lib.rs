//! The pod node: model store and catalogue, model loading, the libp2p mesh, inference and
//! model files served to peers, and the daemon. The `pod` binary (`main.rs`, `cli/`) is a thin
//! command-line layer over this.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod access;
pub mod backend;
pub mod bench;
pub mod blob;
pub mod catalogue;
pub mod config;
pub mod daemon_file;
pub mod home;
pub mod identity;
pub mod loader;
pub mod mesh;
pub mod node;
pub mod profile;
pub mod progress;
pub mod receipts;
pub mod remote;
pub mod source;
pub mod stage;
pub mod store;
pub mod wire;
