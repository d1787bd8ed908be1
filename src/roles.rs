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
//! - `separate`: role `r` is the broker user `<namespace>-<r>`, and each edge is a user of its
//!   own, `<namespace>-edge-<edge id>` ([`Principal`]), each with the least permissions of
//!   [`grant`] and [`edge_grant`]. An edge may bind only its own routing keys on the replies
//!   exchange (a topic permission) and declare only its own queues; a receiver takes what an
//!   edge says only for that edge ([`Trust::admits_for`]). `vigil broker provision` creates
//!   the users. Services then only check the shared topology (passive declares need no
//!   permission); `vigil topology apply`, as the admin role, declares it.

use serde::{Deserialize, Serialize};

use crate::metrics::BrokerMetrics;

/// A role on the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Edge,
    Worker,
    Audit,
    /// What the admin API publishes (an edge that serves it speaks as this role over a second
    /// link): control commands, operators' notes and enrolment requests, and nothing else; it
    /// reads nothing and declares nothing.
    Operator,
    /// Everything in the namespace: the topology, and the operators' tools.
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Edge,
        Role::Worker,
        Role::Audit,
        Role::Operator,
        Role::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::Worker => "worker",
            Role::Audit => "audit",
            Role::Operator => "operator",
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
    /// Control commands (block, kick, pause, forced actions, challenges), taken by edges.
    Control,
    /// A session's start or end: announced to the other edges (a newer session ends an older
    /// one) and sent to the audit trail.
    Session,
    /// Enforced actions, taken by the audit writer.
    Action,
    /// An operator's operation, on its way to the audit trail.
    Note,
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
            Kind::Session => "session",
            Kind::Action => "action",
            Kind::Note => "note",
            Kind::Enroll => "enroll",
            Kind::Webhook => "webhook",
            Kind::Checkpoint => "checkpoint",
        }
    }

    /// The roles that may send this kind. Edges publish frames, actions and their own
    /// sessions; admins may publish frames and actions too (replay, tools). Results come only
    /// from workers. Control, operators' notes and enrolments come only from the operator role
    /// (an edge that serves the admin API publishes them over a link of that role,
    /// `VIGIL_ADMIN_AMQP_URL`) and from admins (the CLI).
    pub fn senders(self) -> &'static [Role] {
        match self {
            Kind::Frame => &[Role::Edge, Role::Admin],
            Kind::Result => &[Role::Worker],
            Kind::Control => &[Role::Operator, Role::Admin],
            Kind::Session => &[Role::Edge],
            Kind::Action => &[Role::Edge, Role::Admin],
            Kind::Note => &[Role::Operator, Role::Admin],
            Kind::Enroll => &[Role::Operator, Role::Admin],
            Kind::Webhook => &[Role::Audit, Role::Admin],
            Kind::Checkpoint => &[Role::Audit],
        }
    }
}

/// The broker user of `role` in `separate` mode. Edges have one user each
/// ([`edge_user`]); `user_of(ns, Role::Edge)` is only the prefix of their names.
pub fn user_of(namespace: &str, role: Role) -> String {
    format!("{namespace}-{}", role.as_str())
}

/// The broker user of edge `edge_id` in `separate` mode: `<namespace>-edge-<edge id>`.
pub fn edge_user(namespace: &str, edge_id: &str) -> String {
    format!("{namespace}-edge-{edge_id}")
}

/// The edge id a broker user stands for (`<namespace>-edge-<id>`), if it is an edge's.
pub fn edge_of_user<'a>(namespace: &str, user: &'a str) -> Option<&'a str> {
    let id = user.strip_prefix(namespace)?.strip_prefix("-edge-")?;
    crate::topology::check_identifier("edge id", id)
        .is_ok()
        .then_some(id)
}

/// A broker user in `separate` mode: a role and, for an edge, which edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Principal {
    pub role: Role,
    /// The edge's id, for the edge role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edge: Option<String>,
}

impl Principal {
    pub fn role(role: Role) -> Self {
        Self { role, edge: None }
    }

    pub fn edge(id: &str) -> Self {
        Self {
            role: Role::Edge,
            edge: Some(id.to_owned()),
        }
    }

    /// Its broker user's name.
    pub fn user(&self, namespace: &str) -> String {
        match &self.edge {
            Some(id) => edge_user(namespace, id),
            None => user_of(namespace, self.role),
        }
    }

    /// Its permissions on the virtual host.
    pub fn grant(&self, namespace: &str) -> Grant {
        match &self.edge {
            Some(id) => edge_grant(namespace, id),
            None => grant(namespace, self.role),
        }
    }

    /// Its topic permissions: an edge may bind only its own routing keys on the replies
    /// exchange, so it can read no other edge's results.
    pub fn topic_grant(&self, namespace: &str) -> Option<TopicGrant> {
        let id = self.edge.as_ref()?;
        Some(TopicGrant {
            exchange: format!("{namespace}.replies"),
            write: "^$".into(),
            read: format!(r"^edge\.{id}\."),
        })
    }
}

/// The users `vigil broker provision` makes: the worker, audit, operator and admin roles, and
/// one user per edge id (edge ids are checked identifiers: `[A-Za-z0-9_-]`, no regex escaping needed).
pub fn principals(edges: &[String]) -> Result<Vec<Principal>, String> {
    let mut out: Vec<Principal> = [Role::Worker, Role::Audit, Role::Operator, Role::Admin]
        .into_iter()
        .map(Principal::role)
        .collect();
    for id in edges {
        crate::topology::check_identifier("edge id", id)?;
        if !out.iter().any(|p| p.edge.as_deref() == Some(id)) {
            out.push(Principal::edge(id));
        }
    }
    Ok(out)
}

/// What a receiver trusts: the broker user behind each role.
#[derive(Clone)]
pub struct Trust {
    mode: RoleMode,
    namespace: String,
    /// This process's own user: in `shared` mode, every role.
    own_user: String,
    /// The users of the roles that are not edges, made once (receivers look on every message).
    role_users: [(Role, String); 4],
    metrics: BrokerMetrics,
}

impl Trust {
    /// In `shared` mode every role is `own_user`, the user this process connects as.
    pub fn new(mode: RoleMode, namespace: &str, own_user: &str, metrics: BrokerMetrics) -> Self {
        Self {
            mode,
            namespace: namespace.to_owned(),
            own_user: own_user.to_owned(),
            role_users: [Role::Worker, Role::Audit, Role::Operator, Role::Admin]
                .map(|r| (r, user_of(namespace, r))),
            metrics,
        }
    }

    /// The role (and edge) a broker user stands for in `separate` mode.
    fn principal<'a>(&self, user: &'a str) -> Option<(Role, Option<&'a str>)> {
        if let Some(id) = edge_of_user(&self.namespace, user) {
            return Some((Role::Edge, Some(id)));
        }
        self.role_users
            .iter()
            .find(|(_, name)| name == user)
            .map(|(r, _)| (*r, None))
    }

    fn judge(&self, kind: Kind, user_id: Option<&str>, edge: Option<&str>) -> bool {
        let trusted = user_id.is_some_and(|u| match self.mode {
            RoleMode::Shared => u == self.own_user,
            RoleMode::Separate => self.principal(u).is_some_and(|(role, own)| {
                kind.senders().contains(&role)
                    && (role != Role::Edge || edge.is_none() || own == edge)
            }),
        });
        if !trusted {
            self.metrics
                .untrusted
                .with_label_values(&[kind.as_str()])
                .inc();
            tracing::warn!(
                kind = kind.as_str(),
                user_id = user_id.unwrap_or("(none)"),
                claims = edge.unwrap_or(""),
                "dropping a message from a publisher not allowed to send it"
            );
        }
        trusted
    }

    /// Whether a message of `kind` published by `user_id` (the AMQP property, checked by the
    /// broker) comes from a role allowed to send it. A refusal is counted and logged.
    pub fn admits(&self, kind: Kind, user_id: Option<&str>) -> bool {
        self.judge(kind, user_id, None)
    }

    /// [`Trust::admits`] for a message that speaks for edge `edge` (its source, or the edge a
    /// session announcement names): an edge may speak only for itself. Other roles allowed to
    /// send `kind` may name any edge.
    pub fn admits_for(&self, kind: Kind, user_id: Option<&str>, edge: &str) -> bool {
        self.judge(kind, user_id, Some(edge))
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

/// A user's topic permissions on one topic exchange: RabbitMQ regular expressions over the
/// routing keys it may publish with (`write`) and bind or consume with (`read`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicGrant {
    pub exchange: String,
    pub write: String,
    pub read: String,
}

/// The least permissions edge `id` needs: its own reply and control queues only (so it can
/// neither read nor squat another edge's), and publishing frames, actions and its sessions'
/// announcements.
pub fn edge_grant(namespace: &str, id: &str) -> Grant {
    let ns = namespace;
    let own = format!(r"{ns}\.(replies|control)\.edge\.{id}");
    Grant {
        configure: format!("^{own}$"),
        write: format!(r"^({ns}\.(frames|actions|control)|{own})$"),
        read: format!(r"^({ns}\.(replies|control)|{own})$"),
    }
}

/// The least permissions `role` needs in `namespace` (a name of letters, digits, `-` and `_`,
/// so it needs no escaping). RabbitMQ asks configure to declare, write to publish to an
/// exchange or to bind a queue, and read to consume a queue or to bind from an exchange;
/// passive declares need nothing. For the edge role, see [`edge_grant`]: this is no one's.
pub fn grant(namespace: &str, role: Role) -> Grant {
    let ns = namespace;
    let nothing = "^$".to_owned();
    match role {
        Role::Edge => Grant {
            configure: nothing.clone(),
            write: nothing.clone(),
            read: nothing,
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
        Role::Operator => Grant {
            configure: nothing.clone(),
            write: format!(r"^{ns}\.(control|actions|enroll)$"),
            read: nothing,
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
            (Kind::Result, "v-edge-e1", false),
            (Kind::Result, "v-admin", false),
            (Kind::Control, "v-admin", true),
            (Kind::Control, "v-edge-e1", false),
            (Kind::Control, "v-worker", false),
            (Kind::Note, "v-admin", true),
            (Kind::Note, "v-operator", true),
            (Kind::Note, "v-edge-e1", false),
            (Kind::Enroll, "v-admin", true),
            (Kind::Enroll, "v-operator", true),
            (Kind::Enroll, "v-edge-e1", false),
            (Kind::Control, "v-operator", true),
            // The operator role steers sessions, never decides about a frame or an action.
            (Kind::Result, "v-operator", false),
            (Kind::Action, "v-operator", false),
            (Kind::Session, "v-operator", false),
            (Kind::Action, "v-edge-e1", true),
            (Kind::Action, "v-audit", false),
            (Kind::Action, "v-worker", false),
            (Kind::Frame, "v-edge-e1", true),
            (Kind::Frame, "v-worker", false),
            (Kind::Result, "guest", false),
            // The old shared edge user, and names that only look like an edge's.
            (Kind::Frame, "v-edge", false),
            (Kind::Frame, "v-edge-", false),
            (Kind::Frame, "v-edge-a.b", false),
            (Kind::Frame, "w-edge-e1", false),
        ];
        for (kind, user, expected) in cases {
            assert_eq!(t.admits(kind, Some(user)), expected, "{kind:?} from {user}");
        }
        assert!(!t.admits(Kind::Result, None));
        assert_eq!(t.metrics.untrusted.with_label_values(&["result"]).get(), 5);
    }

    #[test]
    fn an_edge_speaks_only_for_itself() {
        let t = trust(RoleMode::Separate);
        assert!(t.admits_for(Kind::Session, Some("v-edge-e1"), "e1"));
        assert!(!t.admits_for(Kind::Session, Some("v-edge-e2"), "e1"));
        assert!(!t.admits_for(Kind::Session, Some("v-edge-e1x"), "e1"));
        // Only edges announce sessions, not even the admin role.
        assert!(!t.admits_for(Kind::Session, Some("v-admin"), "e1"));
        // An admin's replayed frame or forced action may name any edge.
        assert!(t.admits_for(Kind::Frame, Some("v-admin"), "e1"));
        assert!(t.admits_for(Kind::Action, Some("v-edge-e2"), "e2"));
        assert!(!t.admits_for(Kind::Action, Some("v-edge-e2"), "e1"));
        assert_eq!(t.metrics.untrusted.with_label_values(&["session"]).get(), 3);
        assert_eq!(t.metrics.untrusted.with_label_values(&["action"]).get(), 1);
    }

    #[test]
    fn shared_mode_accepts_only_the_own_user() {
        let t = trust(RoleMode::Shared);
        assert!(t.admits(Kind::Result, Some("guest")));
        assert!(t.admits(Kind::Control, Some("guest")));
        assert!(t.admits_for(Kind::Session, Some("guest"), "any"));
        assert!(!t.admits(Kind::Control, Some("someone")));
        assert!(!t.admits(Kind::Frame, None));
    }

    #[test]
    fn grants_name_only_the_roles_resources() {
        let re = |s: &str| regex_lite::Regex::new(s).unwrap();
        let edge = Principal::edge("e1").grant("v");
        assert!(re(&edge.configure).is_match("v.replies.edge.e1"));
        assert!(!re(&edge.configure).is_match("v.replies.edge.e2"));
        assert!(!re(&edge.configure).is_match("v.replies.edge.e10"));
        assert!(!re(&edge.read).is_match("v.replies.edge.e2"));
        assert!(!re(&edge.configure).is_match("v.frames.work"));
        assert!(!re(&edge.configure).is_match("v.audit"));
        assert!(re(&edge.write).is_match("v.frames"));
        assert!(!re(&edge.write).is_match("v.replies"));
        assert!(!re(&edge.write).is_match("v.frames.work"));
        assert!(!re(&edge.write).is_match("v.enroll"));
        let topic = Principal::edge("e1").topic_grant("v").unwrap();
        assert_eq!(topic.exchange, "v.replies");
        for key in ["edge.e1.#", "edge.e1.c1"] {
            assert!(re(&topic.read).is_match(key), "{key}");
        }
        for key in [
            "#",
            "edge.#",
            "edge.*.#",
            "edge.e10.#",
            "edge.e2.c1",
            "x.edge.e1.c",
        ] {
            assert!(!re(&topic.read).is_match(key), "{key}");
        }
        assert!(Principal::role(Role::Worker).topic_grant("v").is_none());
        let worker = grant("v", Role::Worker);
        assert!(re(&worker.write).is_match("v.replies"));
        assert!(!re(&worker.write).is_match("v.control"));
        assert!(!re(&worker.write).is_match("v.actions"));
        assert!(!re(&worker.configure).is_match("v.frames.work"));
        let operator = grant("v", Role::Operator);
        for name in ["v.control", "v.actions", "v.enroll"] {
            assert!(re(&operator.write).is_match(name), "{name}");
        }
        for name in [
            "v.frames",
            "v.replies",
            "v.audit",
            "v.frames.work",
            "v.webhooks",
        ] {
            assert!(!re(&operator.write).is_match(name), "{name}");
            assert!(!re(&operator.read).is_match(name), "{name}");
            assert!(!re(&operator.configure).is_match(name), "{name}");
        }
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

    #[test]
    fn principals_are_the_three_roles_and_each_edge_once() {
        let edges = ["e1".to_owned(), "e2".to_owned(), "e1".to_owned()];
        let users: Vec<String> = principals(&edges)
            .unwrap()
            .iter()
            .map(|p| p.user("v"))
            .collect();
        assert_eq!(
            users,
            [
                "v-worker",
                "v-audit",
                "v-operator",
                "v-admin",
                "v-edge-e1",
                "v-edge-e2"
            ]
        );
        assert!(principals(&["a.b".to_owned()]).is_err());
        assert!(principals(&[".*".to_owned()]).is_err());
    }
}
