//! Vigil's integration tests: one binary, the real RabbitMQ (VIGIL_TEST_AMQP_URL, default
//! amqp://guest:guest@127.0.0.1:5672/%2f), the real edge and worker `start` functions, and the
//! real WebSocket protocol. Every test uses its own namespace, so runs never interfere.

// Test code: an unwrap that fails is the test failing, with its message.
#![allow(clippy::unwrap_used)]
// A test binary exports nothing: `pub` here only shares helpers between its modules.
#![allow(unreachable_pub)]

mod support;

mod actions;
mod admin;
mod attack;
mod broker_cluster;
mod browser;
mod capture;
mod cluster;
mod enforcement;
mod faults;
mod garbage;
mod golden;
mod identity;
mod liveness;
mod observability;
mod pipeline;
mod policies;
mod postgres_tls;
mod roles;
mod scaling;
mod sessions;
mod tls;
mod webhooks;
