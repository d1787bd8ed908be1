//! The operator's tools: everything the `vigil` CLI does beyond running a service. None of it
//! is linked into `vigil-edge`, `vigil-worker` or `vigil-audit`; it is built with the `tools`
//! feature (on by default), which the `vigil` binary requires.
//!
//! - [`cli`]: the `vigil` command line; [`answers`]: a simulated candidate's answers to
//!   liveness challenges, picked from real footage by the model's own pose.
//! - [`bench`]: transport, pipeline and model benchmarks; [`loadgen`]: simulated clients;
//!   [`attack`]: the hostile suite.
//! - [`capture`], [`recorder`], [`replay`]: capture files, recording and replay.
//! - [`eval`]: error rates on real data, with [`plots`] for their pictures.
//! - [`models`]: fetching and checking the model files; [`provision`]: broker users per role.

pub mod answers;
pub mod attack;
pub mod bench;
pub mod capture;
pub mod certs;
pub mod cli;
pub mod cost;
pub mod eval;
pub mod loadgen;
pub mod models;
pub mod plots;
pub mod provision;
pub mod recorder;
pub mod replay;
