//! The admin API's own broker link. With separate broker roles an edge's own user may publish
//! neither control commands, nor operators' notes, nor enrolment requests: an edge that serves
//! the admin API publishes them as the operator role (`<ns>-operator`: it may publish those
//! and nothing else), over a second connection
//! (`VIGIL_ADMIN_AMQP_URL`). Edges facing candidates need no such credentials. Without the
//! setting, the admin API publishes over the edge's own link (shared roles).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError, PublisherSlot};
use crate::metrics::BrokerMetrics;

/// How often the link is looked at; a lost one is relinked with the usual backoff.
const WATCH: Duration = Duration::from_secs(1);

/// Connect as the operator role (retrying until `give_up`), and keep the link up until
/// `shutdown`: the slot always holds the current link's publisher.
pub(super) async fn start(
    url: String,
    edge_id: &str,
    metrics: BrokerMetrics,
    give_up: Duration,
    shutdown: CancellationToken,
) -> Result<PublisherSlot, BrokerError> {
    let name = format!("{edge_id}-admin");
    let broker = Broker::connect_with_retry(&url, &name, metrics.clone(), give_up).await?;
    let publisher = Arc::new(broker.publisher().await?);
    let slot = PublisherSlot::new(publisher);
    tokio::spawn(keep(url, name, broker, slot.clone(), metrics, shutdown));
    Ok(slot)
}

async fn keep(
    url: String,
    name: String,
    mut broker: Broker,
    slot: PublisherSlot,
    metrics: BrokerMetrics,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(WATCH) => {}
        }
        if broker.is_connected() && slot.get().is_open() {
            continue;
        }
        // A lost connection, or a channel the broker closed (a refused publish): relink.
        tracing::warn!("lost the operator role's broker link; relinking");
        let fresh = crate::broker::relink(&url, &name, &metrics, &shutdown, |b| async move {
            let publisher = b.publisher().await?;
            Ok::<_, BrokerError>((b, publisher))
        })
        .await;
        let Some((b, publisher)) = fresh else { break };
        slot.swap(Arc::new(publisher));
        broker.close().await;
        broker = b;
        tracing::info!("the operator role's broker link is back");
    }
    slot.get().close().await;
    broker.close().await;
}
