//! The edge's lease in the client directory.
//!
//! Presence rows say which edge holds a client; they count only while that edge's lease runs
//! (`directory::live_presence`). The edge renews its lease every third of `lease_ms`, so one
//! or two missed renewals are survived, and a killed edge's clients read as disconnected
//! within `lease_ms` of its last renewal. Readiness follows the renewals: an edge that cannot
//! reach its directory cannot authenticate anyone, and the load balancer should send clients
//! elsewhere.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::directory::ClientStore;
use crate::telemetry::Health;

/// Keep `edge`'s lease alive until `shutdown`, then give it up.
pub(super) async fn keep(
    store: Arc<dyn ClientStore>,
    edge: String,
    lease: Duration,
    health: Health,
    errors: prometheus::IntCounter,
    shutdown: CancellationToken,
) {
    let every = lease / 3;
    loop {
        let until = crate::wire::now_ms() + lease.as_millis() as u64;
        let ok = renew(&store, &edge, until).await;
        if !ok {
            errors.inc();
        }
        health.set("directory", ok);
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
    }
    // Sessions write their own ends; a lease given up makes any they missed read as ended.
    renew(&store, &edge, 0).await;
}

async fn renew(store: &Arc<dyn ClientStore>, edge: &str, until_ms: u64) -> bool {
    let (store, id) = (store.clone(), edge.to_owned());
    match tokio::task::spawn_blocking(move || store.renew_lease(&id, until_ms)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot renew this edge's directory lease");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "the lease renewal task failed");
            false
        }
    }
}
