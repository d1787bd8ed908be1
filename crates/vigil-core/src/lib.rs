//! Vigil's core: the words, the wire and the decisions, as pure logic. No I/O, no broker, no
//! model runtime, no database: the services read the time, talk to the outside and feed these
//! modules events, and these modules decide. The decisions take the time as an argument; the
//! one wall-clock read is `wire::now_ms`, the helper that stamps envelopes. Every module here is tested
//! over event sequences with `cargo test -p vigil-core`, which builds none of the adapters.
//!
//! - [`domain`]: the shared words (verdict, action, device).
//! - [`wire`]: the broker envelope and the client protocol, and their encodings.
//! - [`policy`]: the per-client action policy.
//! - [`liveness`]: passive liveness over a client's stream, which raises suspicions;
//!   [`challenge`]: the active challenge that decides them.
//! - [`cadence`]: which frames run the phone detector, and which carry the identity over on a
//!   face track.
//! - [`window`]: a session's in-flight window; [`enforcement`]: a session's policy, challenge
//!   and evidence.
//!
//! The rules (what this crate's dependency tree may hold, no I/O in its sources, MessagePack
//! only in `wire`, the one clock read) are checked in CI by `scripts/check-boundaries.sh`.

pub mod cadence;
pub mod challenge;
pub mod domain;
pub mod enforcement;
pub mod liveness;
pub mod policy;
pub mod window;
pub mod wire;
