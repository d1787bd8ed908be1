//! Vigil: continuous identity verification on live camera frames, built around RabbitMQ.
//!
//! # Layout
//! - [`domain`]: the shared words (verdict, action, device), so that the modules below
//!   depend on it rather than on each other.
//! - [`wire`]: the broker envelope and the client protocol; the only module that knows
//!   MessagePack.
//! - [`topology`]: `exchanges.toml` as typed, validated data.
//! - [`broker`]: RabbitMQ through `lapin` (connect, declare, publish with confirms, consume);
//!   [`roles`]: who may publish what, and each role's least permissions; [`management`]:
//!   RabbitMQ's management API, for the policies that carry queue tunables.
//! - [`edge`]: the WebSocket edge node (`vigil-edge`), its admin API, and Vigil's own client.
//! - [`worker`]: the frame worker (`vigil-worker`); [`analyzer`]: what it runs on a frame.
//! - [`inference`]: pixels and models (`image`, `ort`); [`models`]: the model manifest and fetch.
//! - [`policy`]: the per-client action policy; [`liveness`]: liveness over a client's
//!   stream; [`audit`]: the audit writer and its store.
//! - [`directory`]: the client directory (a folder, or PostgreSQL); [`admin`]: client administration over the control plane.
//! - [`capture`], [`recorder`], [`replay`], [`loadgen`]: capture files, recording, replay, load.
//! - [`config`]: typed configuration with `VIGIL_*` overrides and full validation.
//! - [`metrics`]: every Prometheus metric; [`telemetry`]: logs, health, `/metrics`, the
//!   services' `main`.
//! - [`cli`]: the operator CLI (`vigil`), with [`bench`] for the benchmarks, [`eval`] for the
//!   error rates on real data and [`plots`] for their pictures.

pub mod admin;
pub mod analyzer;
pub mod attack;
pub mod audit;
pub mod bench;
pub mod broker;
pub mod capture;
pub mod cli;
pub mod config;
pub mod directory;
pub mod domain;
pub mod edge;
pub mod eval;
pub mod inference;
pub mod liveness;
pub mod loadgen;
pub mod management;
pub mod metrics;
pub mod models;
pub mod operators;
pub mod plots;
pub mod policy;
pub mod provision;
pub mod recorder;
pub mod replay;
pub mod roles;
pub mod telemetry;
pub mod topology;
pub mod wire;
pub mod worker;
