//! Who may say what on the broker.
//!
//! Four roles talk over RabbitMQ: edges, workers, the audit writer and admins. Every publisher
//! stamps its messages with the AMQP `user_id` property, which RabbitMQ checks against the
//! connection's user (a forged one is refused by the broker itself). Every receiver then accepts
//! each kind of event only from the roles that may send it ([`Kind::senders`]); anything else is
//! dropped, counted in `vigil_broker_untrusted_messages_total{kind}` and logged.
//!
//! Two modes ([`RoleMode`], `VIGIL_BROKER_ROLES`):
//! - `shared` (the default, for one machine): every role is the process's own broker user, so
//!   only messages from that user are accepted.
//! - `separate`: role `r` is the broker user `<namespace>-<r>`, each with the least permissions
//!   of [`grant`]. `vigil broker provision` creates them. Services then only check the shared
//!   topology (passive declares need no permission); `vigil topology apply`, as the admin role,
//!   declares it.

use serde::{Deserialize, Serialize};

use crate::metrics::BrokerMetrics;

/// A role on the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Edge,
    Worker,
    Audit,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Edge, Role::Worker, Role::Audit, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::Worker => "worker",
            Role::Audit => "audit",
            Role::Admin => "admin",
        }
    }
}

/// Whether the roles share one broker user or each has its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoleMode {
    #[default]
    Shared,
    Separate,
}

impl std::str::FromStr for RoleMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shared" => Ok(RoleMode::Shared),
            "separate" => Ok(RoleMode::Separate),
            other => Err(format!("`{other}` is not `shared` or `separate`")),
        }
    }
}

/// A kind of event a receiver takes from the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Frames, taken by workers.
    Frame,
    /// Results, taken by edges.
    Result,
    /// Control commands, taken by edges.
    Control,
    /// Enforced actions and admin operations, taken by the audit writer.
    Action,
    /// Enrolment requests, taken by workers.
    Enroll,
    /// Webhook deliveries, taken by the audit writer: its own, or an admin's re-sent failures.
    Webhook,
    /// The audit writer's checkpoints, read by `verify` and by the writer when it starts.
    Checkpoint,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Frame => "frame",
            Kind::Result => "result",
            Kind::Control => "control",
            Kind::Action => "action",
            Kind::Enroll => "enroll",
            Kind::Webhook => "webhook",
            Kind::Checkpoint => "checkpoint",
        }
    }

    /// The roles that may send this kind. Edges publish frames and actions; admins may too
    /// (replay, forced actions). Results come only from workers. Control comes from admins and
    /// from edges, which serve the admin API and announce their sessions.
    pub fn senders(self) -> &'static [Role] {
        match self {
            Kind::Frame => &[Role::Edge, Role::Admin],
            Kind::Result => &[Role::Worker],
            Kind::Control => &[Role::Edge, Role::Admin],
            Kind::Action => &[Role::Edge, Role::Admin],
            Kind::Enroll => &[Role::Edge, Role::Admin],
            Kind::Webhook => &[Role::Audit, Role::Admin],
            Kind::Checkpoint => &[Role::Audit],
        }
    }
}

/// The broker user of `role` in `separate` mode.
pub fn user_of(namespace: &str, role: Role) -> String {
    format!("{namespace}-{}", role.as_str())
}

/// What a receiver trusts: the broker user behind each role.
#[derive(Clone)]
pub struct Trust {
    users: [(Role, String); 4],
    metrics: BrokerMetrics,
}

impl Trust {
    /// In `shared` mode every role is `own_user`, the user this process connects as.
    pub fn new(mode: RoleMode, namespace: &str, own_user: &str, metrics: BrokerMetrics) -> Self {
        let user = |role| match mode {
            RoleMode::Shared => own_user.to_owned(),
            RoleMode::Separate => user_of(namespace, role),
        };
        Self {
            users: Role::ALL.map(|r| (r, user(r))),
            metrics,
        }
    }

    /// Whether a message of `kind` published by `user_id` (the AMQP property, checked by the
    /// broker) comes from a role allowed to send it. A refusal is counted and logged.
    pub fn admits(&self, kind: Kind, user_id: Option<&str>) -> bool {
        let trusted = user_id.is_some_and(|u| {
            self.users
                .iter()
                .any(|(role, name)| name == u && kind.senders().contains(role))
        });
        if !trusted {
            self.metrics
                .untrusted
                .with_label_values(&[kind.as_str()])
                .inc();
            tracing::warn!(
                kind = kind.as_str(),
                user_id = user_id.unwrap_or("(none)"),
                "dropping a message from a publisher not allowed to send it"
            );
        }
        trusted
    }
}

/// A user's permissions on the virtual host, as RabbitMQ regular expressions over resource
/// names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// The least permissions `role` needs in `namespace` (a name of letters, digits, `-` and `_`,
/// so it needs no escaping). RabbitMQ asks configure to declare, write to publish to an
/// exchange or to bind a queue, and read to consume a queue or to bind from an exchange;
/// passive declares need nothing.
pub fn grant(namespace: &str, role: Role) -> Grant {
    let ns = namespace;
    let own_edge_queues = format!(r"{ns}\.(replies|control)\.edge\..+");
    let nothing = "^$".to_owned();
    match role {
        Role::Edge => Grant {
            configure: format!("^{own_edge_queues}$"),
            write: format!(r"^({ns}\.(frames|actions|control|enroll)|{own_edge_queues})$"),
            read: format!(r"^({ns}\.(replies|control)|{own_edge_queues})$"),
        },
        Role::Worker => Grant {
            configure: nothing,
            write: format!(r"^{ns}\.replies$"),
            read: format!(r"^{ns}\.(frames\.work|enroll\.requests)$"),
        },
        Role::Audit => Grant {
            configure: nothing,
            write: format!(r"^{ns}\.(audit\.checkpoints|webhooks)$"),
            read: format!(r"^{ns}\.(audit|audit\.checkpoints|webhooks)$"),
        },
        Role::Admin => {
            let all = format!(r"^{ns}\..+$");
            Grant {
                configure: all.clone(),
                write: all.clone(),
                read: all,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust(mode: RoleMode) -> Trust {
        let metrics = BrokerMetrics::new(&prometheus::Registry::new());
        Trust::new(mode, "v", "guest", metrics)
    }

    #[test]
    fn separate_roles_accept_each_kind_only_from_its_senders() {
        let t = trust(RoleMode::Separate);
        let cases = [
            (Kind::Result, "v-worker", true),
            (Kind::Result, "v-edge", false),
            (Kind::Result, "v-admin", false),
            (Kind::Control, "v-admin", true),
            (Kind::Control, "v-edge", true),
            (Kind::Control, "v-worker", false),
            (Kind::Action, "v-edge", true),
            (Kind::Action, "v-audit", false),
            (Kind::Action, "v-worker", false),
            (Kind::Frame, "v-edge", true),
            (Kind::Frame, "v-worker", false),
            (Kind::Result, "guest", false),
        ];
        for (kind, user, expected) in cases {
            assert_eq!(t.admits(kind, Some(user)), expected, "{kind:?} from {user}");
        }
        assert!(!t.admits(Kind::Result, None));
        assert_eq!(t.metrics.untrusted.with_label_values(&["result"]).get(), 4);
    }

    #[test]
    fn shared_mode_accepts_only_the_own_user() {
        let t = trust(RoleMode::Shared);
        assert!(t.admits(Kind::Result, Some("guest")));
        assert!(t.admits(Kind::Control, Some("guest")));
        assert!(!t.admits(Kind::Control, Some("someone")));
        assert!(!t.admits(Kind::Frame, None));
    }

    #[test]
    fn grants_name_only_the_roles_resources() {
        let re = |s: &str| regex_lite::Regex::new(s).unwrap();
        let edge = grant("v", Role::Edge);
        assert!(re(&edge.configure).is_match("v.replies.edge.e1"));
        assert!(!re(&edge.configure).is_match("v.frames.work"));
        assert!(!re(&edge.configure).is_match("v.audit"));
        assert!(re(&edge.write).is_match("v.frames"));
        assert!(!re(&edge.write).is_match("v.replies"));
        assert!(!re(&edge.write).is_match("v.frames.work"));
        let worker = grant("v", Role::Worker);
        assert!(re(&worker.write).is_match("v.replies"));
        assert!(!re(&worker.write).is_match("v.control"));
        assert!(!re(&worker.write).is_match("v.actions"));
        assert!(!re(&worker.configure).is_match("v.frames.work"));
        let audit = grant("v", Role::Audit);
        assert!(re(&audit.read).is_match("v.audit"));
        assert!(!re(&audit.read).is_match("v.frames.work"));
        assert!(!re(&audit.write).is_match("v.actions"));
        assert!(re(&audit.write).is_match("v.webhooks"));
        assert!(re(&audit.read).is_match("v.webhooks"));
        assert!(!re(&audit.read).is_match("v.webhooks.failed"));
        assert!(!re(&edge.write).is_match("v.webhooks"));
        // Another namespace's resources are out of reach.
        assert!(!re(&grant("v", Role::Admin).write).is_match("w.frames"));
    }
}
