//! Vigil: continuous identity verification on live camera frames, built around RabbitMQ.
//!
//! # Layout
//! The services (`vigil-edge`, `vigil-worker`, `vigil-audit`) are built from the modules below
//! and nothing else; the operator's tools live apart, in [`tools`] (the `tools` feature). The
//! pure logic ([`domain`], [`wire`], [`policy`], [`liveness`], [`challenge`], [`cadence`], and
//! the edge's window and enforcement) is the `vigil-core` crate, re-exported here at its paths.
//! - [`domain`]: the shared words (verdict, action, device), so that the modules below
//!   depend on it rather than on each other.
//! - [`wire`]: the broker envelope and the client protocol, and their encodings.
//! - [`topology`]: `exchanges.toml` as typed, validated data.
//! - [`broker`]: RabbitMQ through `lapin` (connect, declare, publish with confirms, consume);
//!   [`roles`]: who may publish what, and each role's least permissions; [`management`]:
//!   RabbitMQ's management API, for the policies that carry queue tunables.
//! - [`edge`]: the WebSocket edge node (`vigil-edge`), its admin API, and Vigil's own client.
//! - [`worker`]: the frame worker (`vigil-worker`); [`analyzer`]: what it runs on a frame.
//! - [`inference`]: pixels, models (`image`, `ort`) and the model manifest.
//! - [`policy`]: the per-client action policy; [`liveness`]: passive liveness over a client's
//!   stream, which raises suspicions; [`challenge`]: the active challenge that decides them;
//!   [`audit`]: the audit writer (`vigil-audit`) and its store; [`webhooks`]: the signed
//!   webhooks it sends the exam platform for every entry (`reqwest`).
//! - [`directory`]: the client directory (a folder, or PostgreSQL); [`admin`]: client
//!   administration over the control plane; [`operators`]: the operators' named tokens;
//!   [`session_tokens`]: short-lived, signed session tokens (`jsonwebtoken`).
//! - [`config`]: typed configuration with `VIGIL_*` overrides and full validation.
//! - [`metrics`]: every Prometheus metric; [`telemetry`]: logs, health, `/metrics`, the
//!   services' `main`.
//! - [`tools`]: the operator CLI (`vigil`), benchmarks, load, the hostile suite, capture,
//!   record and replay, evaluation on real data, model fetching and broker provisioning.

// The pure logic lives in `vigil-core`; its modules keep their paths here.
pub use vigil_core::{cadence, challenge, domain, liveness, policy, wire};
// The model stack (`image`, `ort`) is `vigil-inference`, here at its old path.
pub use vigil_inference as inference;

pub mod admin;
pub(crate) mod analyzer;
pub mod audit;
pub mod broker;
pub mod config;
pub mod directory;
pub mod edge;
pub(crate) mod management;
pub mod metrics;
pub mod operators;
pub mod roles;
pub mod session_tokens;
pub mod telemetry;
#[cfg(feature = "tools")]
pub mod tools;
pub mod topology;
pub mod webhooks;
pub mod worker;
