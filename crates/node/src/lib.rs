//! The pod node: model store and catalogue, model loading, and (as the mesh lands) the
//! libp2p networking. The `pod` binary in `main.rs` is a thin command-line layer over this.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

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
pub mod store;
pub mod wire;
