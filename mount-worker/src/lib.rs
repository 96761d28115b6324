//! The AgentFS mount worker: one process per mount, serving a host directory
//! through FUSE.
//!
//! A request travels `/dev/fuse` -> fuser's session threads ->
//! [`fuse_adapter::Adapter`] (decode/encode only) -> [`core::FsCore`] (nodes,
//! handles, semantics) -> [`hostfs`] (the system calls on the host). See
//! ARCHITECTURE.md at the top of the repository for the full map.

pub mod binding;
pub mod catalog_change;
pub mod check;
pub mod control;
pub mod core;
pub mod error;
pub mod frozen;
pub mod fuse_adapter;
pub mod handoff;
pub mod hex;
pub mod hostfs;
pub mod layer_index;
pub mod layered;
pub mod logging;
pub mod mount;
pub mod names;
pub mod passthrough;
pub mod preserve;
pub mod proc_events;
pub mod root_cache;
pub mod sandbox;
pub mod snapshot;
pub mod snapview;
pub mod spare;
pub mod state;
pub mod trim;
pub mod watch;
pub mod worker;
