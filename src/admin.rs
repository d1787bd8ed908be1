//! Client administration, shared by the CLI and the edges' HTTP API: change a client's status
//! in the directory, then broadcast the change on `vigil.control` so that every edge enforces it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::broker::{BrokerError, Publisher};
use crate::directory::{
    ClientRecord, ClientStatus, ClientStore, Connection, DirectoryError, Presence, live_presence,
};
use crate::policy::Action;
use crate::wire::{self, AdminOpEvent, ControlCommand, ControlEvent, Envelope, Payload};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error("the change was saved but could not be broadcast: {0}")]
    Broadcast(#[from] BrokerError),
    #[error("client `{0}` not found")]
    NotFound(String),
    #[error("the audit trail did not take the operation: {0}")]
    Audit(String),
}

/// An operation on one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminOp {
    Pause,
    Resume,
    Block,
    Unblock,
    Kick,
    Remove,
    /// Ask the client's live session for a liveness challenge.
    Challenge,
    /// Let a signed-out client start sessions again, with a fresh policy state.
    Readmit,
}

impl AdminOp {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminOp::Pause => "pause",
            AdminOp::Resume => "resume",
            AdminOp::Block => "block",
            AdminOp::Unblock => "unblock",
            AdminOp::Kick => "kick",
            AdminOp::Remove => "remove",
            AdminOp::Challenge => "challenge",
            AdminOp::Readmit => "readmit",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pause" => AdminOp::Pause,
            "resume" => AdminOp::Resume,
            "block" => AdminOp::Block,
            "unblock" => AdminOp::Unblock,
            "kick" => AdminOp::Kick,
            "remove" => AdminOp::Remove,
            "challenge" => AdminOp::Challenge,
            "readmit" => AdminOp::Readmit,
            _ => return None,
        })
    }
}

/// What `list`, `show` and the API show of a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClientView {
    pub id: String,
    pub display_name: String,
    /// `active`, `paused` or `blocked`.
    pub status: ClientStatus,
    /// `active` (connected), `deactivated` or `connection_error`.
    pub connection: Connection,
    pub edge: Option<String>,
    pub connected_since_ms: Option<u64>,
    pub enrolled: bool,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// While connected: the session's frame rate, last verdict and last action, as its edge
    /// last reported them.
    #[serde(default)]
    pub fps: f64,
    #[serde(default)]
    pub last_verdict: Option<String>,
    #[serde(default)]
    pub last_action: Option<String>,
}

impl ClientView {
    pub fn of(record: &ClientRecord, presence: Option<Presence>) -> Self {
        let connection = presence
            .as_ref()
            .map_or(Connection::Deactivated, |p| p.connection);
        let live = connection == Connection::Active;
        Self {
            id: record.id.clone(),
            display_name: record.display_name.clone(),
            status: record.status,
            connection,
            edge: presence.as_ref().filter(|_| live).map(|p| p.edge.clone()),
            connected_since_ms: presence.as_ref().filter(|_| live).map(|p| p.since_ms),
            enrolled: record.reference.is_some(),
            created_at_ms: record.created_at_ms,
            updated_at_ms: record.updated_at_ms,
            fps: presence.as_ref().filter(|_| live).map_or(0.0, |p| p.fps),
            last_verdict: presence
                .as_ref()
                .filter(|_| live)
                .and_then(|p| p.last_verdict.clone()),
            last_action: presence
                .as_ref()
                .filter(|_| live)
                .and_then(|p| p.last_action.clone()),
        }
    }
}

/// Every client, with its status and connection, in id order.
pub fn list(store: &dyn ClientStore) -> Result<Vec<ClientView>, AdminError> {
    Ok(list_page(store, None, usize::MAX, None)?.clients)
}

/// One page of clients in id order: those after `after`, of `status` when given; the presence
/// (one directory read each) is looked up for the page's clients only.
#[derive(Debug)]
pub struct Page {
    pub clients: Vec<ClientView>,
    /// How many clients match, on every page.
    pub total: usize,
    /// The id to ask for the next page after, when there is one.
    pub next: Option<String>,
}

pub fn list_page(
    store: &dyn ClientStore,
    after: Option<&str>,
    limit: usize,
    status: Option<ClientStatus>,
) -> Result<Page, AdminError> {
    let now = wire::now_ms();
    if limit == 0 {
        let (_, total) = store.page(after, 0, status)?;
        return Ok(Page {
            clients: Vec::new(),
            total,
            next: None,
        });
    }
    // One more than the page, to know whether another follows.
    let (page, total) = store.page(after, limit.saturating_add(1), status)?;
    let next = (page.len() > limit).then(|| page[limit - 1].id.clone());
    let ids: Vec<String> = page.iter().take(limit).map(|r| r.id.clone()).collect();
    let mut presences = store.live_presences(&ids, now)?;
    let clients = page
        .iter()
        .take(limit)
        .map(|r| ClientView::of(r, presences.remove(&r.id)))
        .collect();
    Ok(Page {
        clients,
        total,
        next,
    })
}

pub fn show(store: &dyn ClientStore, id: &str) -> Result<ClientView, AdminError> {
    let record = store
        .get(id)?
        .ok_or_else(|| AdminError::NotFound(id.to_owned()))?;
    Ok(ClientView::of(
        &record,
        live_presence(store, id, wire::now_ms())?,
    ))
}

/// Administration over one directory, the control exchange and the audit trail.
pub struct Admin {
    pub store: Arc<dyn ClientStore>,
    /// The publisher to broadcast with (swapped by its owner after a reconnect).
    pub publisher: crate::broker::PublisherSlot,
    pub control_exchange: String,
    /// Where operations go on their way to the audit trail.
    pub actions_exchange: String,
    /// The node the operations are made on: an edge id, or `cli`.
    pub source: String,
}

impl Admin {
    /// Apply `op` to client `id` for `operator`: save the status (blocked and paused survive
    /// reconnects), broadcast the command, and audit the operation. Returns the client as it
    /// is now (`None` once removed).
    pub async fn apply(
        &self,
        id: &str,
        op: AdminOp,
        operator: &str,
    ) -> Result<Option<ClientView>, AdminError> {
        // The trail first: a change the broker cannot take into the trail is not made. Once
        // confirmed, the entry stands even if the change then fails, and a second entry says
        // so.
        if self.store.get(id)?.is_none() {
            return Err(AdminError::NotFound(id.to_owned()));
        }
        self.audit(id, op.as_str(), operator).await?;
        let store = self.store.clone();
        let owned = id.to_owned();
        let changed =
            tokio::task::spawn_blocking(move || -> Result<Option<ClientView>, AdminError> {
                let status = match op {
                    AdminOp::Pause => Some(ClientStatus::Paused),
                    AdminOp::Resume | AdminOp::Unblock => Some(ClientStatus::Active),
                    AdminOp::Block => Some(ClientStatus::Blocked),
                    AdminOp::Kick | AdminOp::Challenge => None,
                    AdminOp::Readmit => {
                        // A fresh start: the signed-out escalation is not carried into the
                        // sessions the operator allowed.
                        store.put_policy(
                            &owned,
                            &crate::policy::ClientPolicy::new().save(wire::now_ms()),
                        )?;
                        None
                    }
                    AdminOp::Remove => {
                        store.remove(&owned)?;
                        return Ok(None);
                    }
                };
                // One atomic step: a concurrent enrolment or operator keeps its change.
                let record = store.update(&owned, &mut |record| {
                    if let Some(status) = status {
                        record.status = status;
                    }
                    // A block ends the session tokens handed out so far: unblocking does not
                    // bring them back.
                    if op == AdminOp::Block {
                        record.sessions_not_before_ms = wire::now_ms();
                    }
                    if op == AdminOp::Readmit && record.status == ClientStatus::SignedOut {
                        record.status = ClientStatus::Active;
                    }
                })?;
                Ok(Some(ClientView::of(
                    &record,
                    live_presence(&*store, &owned, wire::now_ms())?,
                )))
            })
            .await
            .expect("directory task does not panic");
        let view = match changed {
            Ok(view) => view,
            Err(e) => {
                let failed = format!("{}:failed", op.as_str());
                if let Err(a) = self.audit_with(id, &failed, operator, e.to_string()).await {
                    tracing::warn!(error = %a, client = %id, "the failed operation's entry was not audited");
                }
                return Err(e);
            }
        };
        let command = match op {
            AdminOp::Pause => ControlCommand::Pause,
            AdminOp::Resume => ControlCommand::Resume,
            AdminOp::Block => ControlCommand::Block,
            AdminOp::Unblock => ControlCommand::Unblock,
            AdminOp::Kick | AdminOp::Remove => ControlCommand::Kick,
            AdminOp::Challenge => ControlCommand::Challenge,
            // Nothing live to tell: a signed-out client has no session.
            AdminOp::Readmit => ControlCommand::Unblock,
        };
        self.broadcast(id, command, operator).await?;
        Ok(view)
    }

    /// Add a client for `operator`, and audit it.
    pub async fn add(
        &self,
        record: ClientRecord,
        operator: &str,
    ) -> Result<ClientView, AdminError> {
        let store = self.store.clone();
        let id = record.id.clone();
        crate::directory::check_client_id(&id)?;
        if store.get(&id)?.is_some() {
            return Err(DirectoryError::Exists(id).into());
        }
        self.audit(&id, "add", operator).await?;
        let view = tokio::task::spawn_blocking(move || -> Result<ClientView, AdminError> {
            store.add(&record)?;
            show(&*store, &record.id)
        })
        .await
        .expect("directory task does not panic");
        if let Err(e) = &view
            && let Err(a) = self
                .audit_with(&id, "add:failed", operator, e.to_string())
                .await
        {
            tracing::warn!(error = %a, client = %id, "the failed operation's entry was not audited");
        }
        view
    }

    /// Force an action on a connected client; it takes the policy's path, audit included (the
    /// action's entry names the operator, and so does the operation's own entry).
    pub async fn force(&self, id: &str, action: Action, operator: &str) -> Result<(), AdminError> {
        if self.store.get(id)?.is_none() {
            return Err(AdminError::NotFound(id.to_owned()));
        }
        self.audit(id, &format!("force:{}", action.as_str()), operator)
            .await?;
        self.broadcast(id, ControlCommand::ForceAction { action }, operator)
            .await
    }

    fn publisher(&self) -> Arc<Publisher> {
        self.publisher.get()
    }

    pub async fn broadcast(
        &self,
        id: &str,
        command: ControlCommand,
        operator: &str,
    ) -> Result<(), AdminError> {
        publish_control(
            &self.publisher(),
            &self.control_exchange,
            id,
            operator,
            command,
        )
        .await?;
        Ok(())
    }

    /// Send the operation to the audit trail, under a bounded confirm.
    pub async fn audit(&self, id: &str, operation: &str, operator: &str) -> Result<(), AdminError> {
        self.audit_with(id, operation, operator, String::new())
            .await
    }

    /// [`Admin::audit`], with what the operation changed or read.
    pub async fn audit_with(
        &self,
        id: &str,
        operation: &str,
        operator: &str,
        detail: String,
    ) -> Result<(), AdminError> {
        let env = Envelope {
            schema: wire::SCHEMA,
            id: Uuid::now_v7(),
            source: self.source.clone(),
            seq: 0,
            client_id: id.to_owned(),
            produced_at_ms: wire::now_ms(),
            deadline_ms: 0,
            traceparent: wire::new_traceparent(),
            payload: Payload::AdminOp(AdminOpEvent {
                operation: operation.to_owned(),
                operator: operator.to_owned(),
                at_ms: wire::now_ms(),
                detail,
            }),
        };
        let confirmed = async {
            self.publisher()
                .publish(&self.actions_exchange, "", &env)
                .await?
                .wait()
                .await
        };
        match tokio::time::timeout(std::time::Duration::from_secs(10), confirmed).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AdminError::Audit(e.to_string())),
            Err(_) => Err(AdminError::Audit(
                "the broker did not confirm within 10 s".into(),
            )),
        }
    }
}

/// What an enrolment's trail entry records: the SHA-256 of each photo, and of the template it
/// replaced and the one it made (as the directory keeps them, base64), so that a later look
/// can tell which photos made which template.
pub fn enrollment_detail(photos: &[Vec<u8>], old: Option<&str>, new: &str) -> String {
    use sha2::{Digest, Sha256};
    let sha = |b: &[u8]| hex::encode(Sha256::digest(b));
    format!(
        "photos={} template_old={} template_new={}",
        photos.iter().map(|p| sha(p)).collect::<Vec<_>>().join(","),
        old.map_or_else(|| "none".to_owned(), |t| sha(t.as_bytes())),
        sha(new.as_bytes())
    )
}

/// Publish one control event under confirms.
pub async fn publish_control(
    publisher: &Publisher,
    exchange: &str,
    client_id: &str,
    issued_by: &str,
    command: ControlCommand,
) -> Result<(), BrokerError> {
    let env = Envelope {
        schema: wire::SCHEMA,
        id: Uuid::now_v7(),
        source: issued_by.to_owned(),
        seq: 0,
        client_id: client_id.to_owned(),
        produced_at_ms: wire::now_ms(),
        deadline_ms: 0,
        traceparent: wire::new_traceparent(),
        payload: Payload::Control(ControlEvent {
            command,
            issued_by: issued_by.to_owned(),
        }),
    };
    publisher.publish(exchange, "", &env).await?.wait().await
}
