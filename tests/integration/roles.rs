//! Roles on the broker: `vigil broker provision` makes one user per role on a private node,
//! the services run as their roles, and forgeries fail: by the broker's permissions, by its
//! `user_id` check, and by each receiver's check of who published what.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use prometheus::Registry;
use uuid::Uuid;
use vigil::broker::Broker;
use vigil::edge::client::{Connection, Incoming};
use vigil::inference::synthetic_jpeg;
use vigil::metrics::BrokerMetrics;
use vigil::policy::Action;
use vigil::roles::RoleMode;
use vigil::wire::client::{Encoding, ServerMsg};
use vigil::wire::{self, ActionEvent, Analysis, ControlCommand, Envelope, FrameResult, Payload};

use crate::support::{PrivateBroker, TOKEN, TestEnv, eventually, metric};

const ADMIN_TOKEN: &str = "admin-token-0123456789";

fn envelope(client_id: &str, payload: Payload) -> Envelope {
    Envelope {
        schema: wire::SCHEMA,
        id: Uuid::now_v7(),
        source: "e1".into(),
        seq: 1,
        client_id: client_id.into(),
        produced_at_ms: wire::now_ms(),
        deadline_ms: wire::now_ms() + 30_000,
        traceparent: wire::new_traceparent(),
        payload,
    }
}

async fn connect(url: &str) -> Broker {
    Broker::connect(url, "test", BrokerMetrics::new(&Registry::new()))
        .await
        .expect("broker reachable")
}

/// Publish `env` as the user of `broker` and wait for the broker's answer.
async fn publish(broker: &Broker, exchange: &str, key: &str, env: &Envelope) -> Result<(), String> {
    let publisher = broker.publisher().await.map_err(|e| e.to_string())?;
    let confirm = publisher
        .publish(exchange, key, env)
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(10), confirm.wait())
        .await
        .map_err(|_| "no confirm".to_owned())?
        .map_err(|e| e.to_string())
}

async fn next_msg(conn: &mut Connection) -> ServerMsg {
    match tokio::time::timeout(Duration::from_secs(15), conn.recv()).await {
        Ok(Some(Ok(Incoming::Msg(m)))) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_is_its_own_user_and_forgeries_have_no_effect() {
    let rabbit = PrivateBroker::start().await;
    let mut env = TestEnv::new("roles");
    let guest_url = rabbit.url();
    env.cfg.amqp_url = guest_url.clone();
    env.cfg.evidence_dir = env.clients_dir.join("evidence");

    // Provision the roles with the CLI, as an operator would on the broker's host.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"));
    cmd.args([
        "broker",
        "provision",
        "--rabbitmqctl",
        PrivateBroker::CTL,
        "--node",
        &rabbit.node,
        "--edge",
        "e1",
        "--edge",
        "e2",
        "--json",
    ])
    .env("VIGIL_NAMESPACE", &env.cfg.namespace)
    .env("VIGIL_AMQP_URL", &guest_url);
    rabbit.env(&mut cmd);
    let out = crate::support::output(&mut cmd);
    assert!(
        out.status.success(),
        "provision: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let users: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // A role's URL, or an edge's (`edge:e1`).
    let url = |who: &str| -> String {
        let (role, edge) = who.split_once(':').unwrap_or((who, ""));
        users
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["role"] == role && u["edge"].as_str().unwrap_or("") == edge)
            .and_then(|u| u["url"].as_str())
            .unwrap_or_else(|| panic!("no {who} user in {users}"))
            .to_owned()
    };
    let ns = env.cfg.namespace.clone();
    let listed = rabbit.ctl_output(&["list_users", "--silent"]);
    for user in ["worker", "audit", "operator", "admin", "edge-e1", "edge-e2"] {
        assert!(
            listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(format!("{ns}-{user}").as_str())),
            "{listed}"
        );
    }
    assert!(
        !listed
            .lines()
            .any(|l| l.split_whitespace().next() == Some(format!("{ns}-edge").as_str())),
        "no edge user is shared: {listed}"
    );

    // Every service as its own role; edge e1 serves the admin API over the operator role's link.
    env.cfg.broker_roles = RoleMode::Separate;
    env.cfg.amqp_url = url("edge:e1");
    env.cfg.edge.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    env.cfg.edge.admin_token = Some(ADMIN_TOKEN.into());
    env.cfg.edge.admin_amqp_url = Some(url("operator"));
    let edge_url = env.start_edge("e1").await;
    env.cfg.amqp_url = url("worker");
    env.start_worker("w1").await;
    env.cfg.amqp_url = url("audit");
    let audit_registry = Registry::new();
    let writer = vigil::audit::start(
        env.cfg.clone(),
        audit_registry.clone(),
        env.shutdown.clone(),
    )
    .await
    .expect("the audit writer starts as its role");
    // The admin role deletes the namespace at the end.
    env.cfg.amqp_url = url("admin");
    env.add_client("c1");

    // The pipeline works as the roles.
    let (mut conn, welcome) = Connection::connect(&edge_url, "c1", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    let ServerMsg::Welcome { session_id, .. } = welcome else {
        panic!("{welcome:?}")
    };
    let session = u64::from_str_radix(&session_id, 16).unwrap();
    let jpeg = synthetic_jpeg(64, 48, 1, 0);
    conn.send_frame(1, 0, &jpeg).await.unwrap();
    assert!(matches!(
        next_msg(&mut conn).await,
        ServerMsg::Result { seq: 1, .. }
    ));

    let guest = connect(&guest_url).await;
    let worker = connect(&url("worker")).await;
    let admin = connect(&url("admin")).await;
    // Another edge: a real one, which a candidate-facing machine's break-in would give.
    let other_edge = connect(&url("edge:e2")).await;
    let edge_registry = &env.edge_registries[0];
    let untrusted = |registry: &Registry, kind: &str| {
        metric(
            registry,
            "vigil_broker_untrusted_messages_total",
            Some(("kind", kind)),
        )
    };

    // 1. A result from anyone but a worker: the guest administrator, and the admin role.
    let forged_result = envelope(
        "c1",
        Payload::Result(FrameResult {
            session,
            seq: 2,
            frame_id: Uuid::now_v7(),
            analyzer: "forged".into(),
            analyze_us: 1,
            analysis: Analysis::FrameInfo {
                width: 1,
                height: 1,
                components: 3,
            },
        }),
    );
    for from in [&guest, &admin] {
        publish(from, &format!("{ns}.replies"), "edge.e1.c1", &forged_result)
            .await
            .expect("the broker takes it; the edge must not");
    }
    eventually(
        "forged results counted",
        Duration::from_secs(10),
        || async { (untrusted(edge_registry, "result") >= 2.0).then_some(()) },
    )
    .await;
    // Dropped at the gate, before the session window could see them.
    assert_eq!(
        metric(edge_registry, "vigil_edge_results_orphaned_total", None),
        0.0
    );
    assert_eq!(
        metric(edge_registry, "vigil_edge_results_duplicate_total", None),
        0.0
    );

    // 2. A control command: a worker may not publish one at all; the guest's is dropped.
    let block = envelope(
        "c1",
        Payload::Control(wire::ControlEvent {
            command: ControlCommand::Block,
            issued_by: "forger".into(),
        }),
    );
    let refused = publish(&worker, &format!("{ns}.control"), "", &block).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("ACCESS_REFUSED") || e.contains("403")),
        "a worker publishing control: {refused:?}"
    );
    // The guest administrator's and another edge's are taken by the broker and dropped by
    // the edge: control comes only from the admin role.
    for from in [&guest, &other_edge] {
        publish(from, &format!("{ns}.control"), "", &block)
            .await
            .unwrap();
    }
    eventually(
        "forged control counted",
        Duration::from_secs(10),
        || async { (untrusted(edge_registry, "control") >= 2.0).then_some(()) },
    )
    .await;
    // Another edge announcing a session in e1's name (which would end c1's with 4409): only
    // e1 may say what starts on e1.
    let squat = envelope(
        "c1",
        Payload::Control(wire::ControlEvent {
            command: ControlCommand::SessionStarted {
                edge: "e1".into(),
                session: u64::MAX,
                since_ms: wire::now_ms() + 60_000,
            },
            issued_by: "e1".into(),
        }),
    );
    publish(&other_edge, &format!("{ns}.control"), "", &squat)
        .await
        .unwrap();
    eventually(
        "a session announced in another edge's name counted",
        Duration::from_secs(10),
        || async { (untrusted(edge_registry, "session") >= 1.0).then_some(()) },
    )
    .await;
    // Nor may an edge, even in its own name, announce a session from the future, which would
    // be newer than any honest one to come.
    let own = connect(&url("edge:e1")).await;
    let future = envelope(
        "c1",
        Payload::Control(wire::ControlEvent {
            command: ControlCommand::SessionStarted {
                edge: "e1".into(),
                session: u64::MAX,
                since_ms: wire::now_ms() + 86_400_000,
            },
            issued_by: "e1".into(),
        }),
    );
    publish(&own, &format!("{ns}.control"), "", &future)
        .await
        .unwrap();
    eventually(
        "a session from the future counted",
        Duration::from_secs(10),
        || async {
            (metric(
                edge_registry,
                "vigil_edge_bad_messages_total",
                Some(("kind", "control")),
            ) >= 1.0)
                .then_some(())
        },
    )
    .await;
    own.close().await;
    // Still served: the block had no effect.
    conn.send_frame(3, 0, &jpeg).await.unwrap();
    assert!(matches!(
        next_msg(&mut conn).await,
        ServerMsg::Result { seq: 3, .. }
    ));

    // 3. An action from the guest never reaches the trail.
    let action = envelope(
        "c1",
        Payload::Action(ActionEvent {
            action_id: Uuid::now_v7(),
            evidence_id: Uuid::now_v7(),
            action: Action::SignOut,
            reason: "spoof".into(),
            origin: "policy".into(),
            session,
            decided_at_ms: wire::now_ms(),
            rule: "forged".into(),
            evidence: Vec::new(),
            operator: None,
            challenge: None,
        }),
    );
    // From the guest, and from another edge in e1's name (the envelope's source): neither is
    // written. Nor is an operator's note from an edge.
    let note = envelope(
        "c1",
        Payload::AdminOp(wire::AdminOpEvent {
            operation: "unblock".into(),
            operator: "someone".into(),
            at_ms: wire::now_ms(),
            detail: String::new(),
        }),
    );
    for (from, env) in [
        (&guest, &action),
        (&other_edge, &action),
        (&other_edge, &note),
    ] {
        publish(from, &format!("{ns}.actions"), "", env)
            .await
            .unwrap();
    }
    eventually(
        "forged entries counted",
        Duration::from_secs(10),
        || async {
            (untrusted(&audit_registry, "action") >= 2.0
                && untrusted(&audit_registry, "note") >= 1.0)
                .then_some(())
        },
    )
    .await;
    assert!(
        vigil::audit::records(&env.cfg.evidence_dir)
            .unwrap()
            .is_empty()
    );
    assert!(
        !vigil::audit::notes(&env.cfg.evidence_dir)
            .unwrap()
            .iter()
            .any(|n| matches!(n, vigil::audit::Note::Admin { .. })),
        "an edge's note is not in the trail"
    );

    // Another edge can neither read e1's results nor take e1's queues: binding anything but
    // its own routing keys on the replies exchange is refused (a topic permission), and so is
    // declaring e1's reply queue.
    let raw = lapin::Connection::connect(&url("edge:e2"), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let own_queue = format!("{ns}.replies.edge.e2");
    let declare = |name: String| {
        let raw = &raw;
        async move {
            let ch = raw.create_channel().await.unwrap();
            let declared = ch
                .queue_declare(
                    name.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await;
            (ch, declared)
        }
    };
    let (_, squatted) = declare(format!("{ns}.replies.edge.e1")).await;
    assert!(
        squatted
            .as_ref()
            .is_err_and(|e| e.to_string().contains("ACCESS_REFUSED")),
        "e2 declaring e1's reply queue: {squatted:?}"
    );
    for key in ["#", "edge.#", "edge.*.#", "edge.e1.#", "edge.e1.c1"] {
        // A refused bind closes its channel: one channel each.
        let (ch, declared) = declare(own_queue.clone()).await;
        declared.expect("e2 declares its own reply queue");
        let bound = ch
            .queue_bind(
                own_queue.as_str().into(),
                format!("{ns}.replies").as_str().into(),
                key.into(),
                lapin::options::QueueBindOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await;
        assert!(
            bound
                .as_ref()
                .is_err_and(|e| e.to_string().contains("ACCESS_REFUSED")),
            "e2 binding `{key}`: {bound:?}"
        );
    }
    // Its own key binds (the edge's own start-up does this).
    let (ch, declared) = declare(own_queue.clone()).await;
    declared.unwrap();
    ch.queue_bind(
        own_queue.as_str().into(),
        format!("{ns}.replies").as_str().into(),
        "edge.e2.#".into(),
        lapin::options::QueueBindOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("an edge binds its own routing keys");
    let _ = raw.close(200, "bye".into()).await;

    // The operator role, which the admin API speaks as, publishes control and reads nothing:
    // not the candidates' frames, not the trail's queue.
    let raw = lapin::Connection::connect(&url("operator"), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    for queue in ["frames.work", "audit"] {
        let ch = raw.create_channel().await.unwrap();
        let got = ch
            .basic_get(
                format!("{ns}.{queue}").as_str().into(),
                lapin::options::BasicGetOptions::default(),
            )
            .await;
        assert!(
            got.as_ref()
                .is_err_and(|e| e.to_string().contains("ACCESS_REFUSED")),
            "the operator role reading {queue}: {got:?}"
        );
    }
    let _ = raw.close(200, "bye".into()).await;

    // The admin role's forced action takes the real path: the edge enforces it, and the
    // writer stores the edge's action.
    let admin_ops = vigil::admin::Admin {
        store: std::sync::Arc::new(vigil::directory::FolderStore::open(&env.clients_dir).unwrap()),
        publisher: vigil::broker::PublisherSlot::new(std::sync::Arc::new(
            admin.publisher().await.unwrap(),
        )),
        control_exchange: format!("{ns}.control"),
        actions_exchange: format!("{ns}.actions"),
        source: "cli".into(),
    };
    admin_ops
        .force("c1", Action::Warn, "operator")
        .await
        .unwrap();
    assert!(matches!(
        next_msg(&mut conn).await,
        ServerMsg::Action {
            action: Action::Warn,
            ..
        }
    ));
    let dir = env.cfg.evidence_dir.clone();
    let stored = eventually("the real action stored", Duration::from_secs(15), || {
        let dir = dir.clone();
        async move { vigil::audit::records(&dir).ok().filter(|r| !r.is_empty()) }
    })
    .await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].action, Action::Warn);
    assert_eq!(stored[0].operator.as_deref(), Some("operator"));
    // The operation itself is in the trail too, with who made it.
    let notes = eventually("the operation stored", Duration::from_secs(15), || {
        let dir = dir.clone();
        async move {
            let admin: Vec<_> = vigil::audit::notes(&dir)
                .ok()?
                .into_iter()
                .filter(|n| matches!(n, vigil::audit::Note::Admin { .. }))
                .collect();
            (!admin.is_empty()).then_some(admin)
        }
    })
    .await;
    assert!(
        matches!(&notes[..], [vigil::audit::Note::Admin { operator, operation, .. }]
            if operator == "operator" && operation == "force:warn"),
        "{notes:?}"
    );

    // The admin API's block goes out over the operator role's link, and the edge takes it.
    let admin_api = env.edges[0].admin_addr.expect("admin API on");
    let (status, body) = crate::support::http(
        admin_api,
        "POST",
        "/v1/admin/clients/c1/block",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        matches!(
            next_msg(&mut conn).await,
            ServerMsg::Error {
                code: wire::client::ErrorCode::Blocked,
                ..
            }
        ),
        "the block reached the session"
    );

    // A checkpoint from anyone but the audit writer's role: a worker or an edge may not publish
    // to the stream at all, and the admin role's checkpoint (ahead of the log, unsigned) is
    // not believed by whoever reads the stream.
    let checkpoints = format!("{ns}.audit.checkpoints");
    for (who, broker) in [("a worker", &worker), ("another edge", &other_edge)] {
        let junk = envelope(
            "c1",
            Payload::Control(wire::ControlEvent {
                command: ControlCommand::Kick,
                issued_by: "x".into(),
            }),
        );
        let refused = publish(broker, &checkpoints, "", &junk).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("ACCESS_REFUSED") || e.contains("403")),
            "{who} publishing a checkpoint: {refused:?}"
        );
    }
    let forged = serde_json::json!({
        "seq": 1_000_000u64, "hash": "0".repeat(64), "written_at_ms": 1u64,
    });
    let publisher = admin.publisher().await.unwrap();
    let confirm = publisher
        .publish_raw(&checkpoints, "", forged.to_string().as_bytes())
        .await
        .unwrap();
    confirm
        .wait()
        .await
        .expect("the admin role may publish there");
    drop(publisher);
    let reader = connect(&url("audit")).await;
    let scan = vigil::audit::newest_checkpoint(
        &reader,
        &checkpoints,
        &reader.trust(RoleMode::Separate, &ns),
        None,
        false,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(scan.ignored >= 1, "{scan:?}");
    assert!(
        scan.newest.as_ref().is_none_or(|c| c.seq < 1_000_000),
        "the admin role's checkpoint was believed: {scan:?}"
    );
    reader.close().await;

    // 4. A forged `user_id`: a worker claiming to be the admin is refused by the broker.
    let raw = lapin::Connection::connect(&url("worker"), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = raw.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let forged = async {
        channel
            .basic_publish(
                format!("{ns}.replies").as_str().into(),
                "edge.e1.c1".into(),
                BasicPublishOptions::default(),
                &forged_result.encode().unwrap(),
                lapin::BasicProperties::default().with_user_id(format!("{ns}-admin").into()),
            )
            .await?
            .await
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), forged)
        .await
        .expect("the broker answers");
    assert!(
        answer
            .as_ref()
            .is_err_and(|e| e.to_string().contains("user_id")),
        "a forged user_id: {answer:?}"
    );
    let _ = raw.close(200, "bye".into()).await;

    for b in [guest, worker, admin, other_edge] {
        b.close().await;
    }
    conn.close().await;
    env.shutdown.cancel();
    writer.join().await.unwrap();
    env.teardown().await;
}

/// Runs its closure when dropped, a panic included.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// `vigil broker provision` where `rabbitmqctl` cannot be run: through the management HTTP
/// API. Each role's user connects with the password printed, its permissions are exactly
/// `roles::grant`, and a second run rotates the passwords.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_through_the_management_api_without_rabbitmqctl() {
    use vigil::roles::principals;
    let (rabbit, api_url) = PrivateBroker::start_with_management().await;
    let ns = format!("t-mgmt-{:08x}", rand::random::<u32>());
    let cfg = vigil::config::Config {
        broker_management_url: Some(api_url.clone()),
        amqp_url: rabbit.url(),
        ..Default::default()
    };
    let api = cfg.management().unwrap().expect("a management URL");
    // The users go at the end, a panic included (before the node: declared after it).
    let _cleanup = {
        let users: Vec<String> = principals(&["e1".to_owned()])
            .unwrap()
            .iter()
            .map(|p| p.user(&ns))
            .collect();
        let api = api.clone();
        OnDrop(move || {
            let (api, users) = (api.clone(), users.clone());
            // A runtime of its own: this may run while the test's runtime unwinds.
            let done = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(api.delete_users(&users))
            })
            .join();
            if let Ok(Err(e)) = done {
                eprintln!("could not delete the provisioned users: {e}");
            }
        })
    };
    let guest_url = rabbit.url();
    let provision = || {
        // `auto`, with no rabbitmqctl to find: the management API is used.
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"));
        cmd.args([
            "broker",
            "provision",
            "--rabbitmqctl",
            "/nonexistent/rabbitmqctl",
            "--edge",
            "e1",
            "--json",
        ])
        .env("VIGIL_NAMESPACE", &ns)
        .env("VIGIL_AMQP_URL", &guest_url)
        .env("VIGIL_BROKER_MANAGEMENT_URL", &api_url);
        let out = crate::support::output(&mut cmd);
        assert!(
            out.status.success(),
            "provision: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
    };
    let can_connect = |url: String| async move {
        let conn = tokio::time::timeout(
            Duration::from_secs(15),
            lapin::Connection::connect(&url, lapin::ConnectionProperties::default()),
        )
        .await
        .expect("the broker answers");
        match conn {
            Ok(c) => {
                let _ = c.close(200, "bye".into()).await;
                true
            }
            Err(_) => false,
        }
    };

    let everyone = principals(&["e1".to_owned()]).unwrap();
    let pick = |all: &[serde_json::Value], p: &vigil::roles::Principal| {
        all.iter()
            .find(|u| u["user"] == p.user(&ns).as_str())
            .unwrap_or_else(|| panic!("no {p:?} user in {all:?}"))
            .clone()
    };
    let first = provision();
    assert_eq!(first.len(), everyone.len(), "{first:?}");
    for p in &everyone {
        let user = p.user(&ns);
        let entry = pick(&first, p);
        assert_eq!(entry["role"], p.role.as_str());
        assert_eq!(entry["created"], true, "{entry}");
        let url = entry["url"].as_str().unwrap().to_owned();
        assert!(can_connect(url).await, "{user} connects with its password");
        assert_eq!(api.permissions(&user).await.unwrap(), p.grant(&ns));
        assert_eq!(
            api.topic_permissions(&user).await.unwrap(),
            p.topic_grant(&ns).into_iter().collect::<Vec<_>>()
        );
        let shown = api.user(&user).await.unwrap();
        assert_eq!(shown["tags"], serde_json::json!([]), "{shown}");
    }
    // The topology was declared as the admin user.
    let admin = first.iter().find(|u| u["role"] == "admin").unwrap();
    let admin_broker = connect(admin["url"].as_str().unwrap()).await;
    admin_broker.close().await;

    // Again: the same users, new passwords; the old ones no longer work.
    let second = provision();
    for p in &everyone {
        let (old, new) = (pick(&first, p), pick(&second, p));
        assert_eq!(new["created"], false, "{new}");
        assert_ne!(old["password"], new["password"]);
        assert!(can_connect(new["url"].as_str().unwrap().to_owned()).await);
        assert!(!can_connect(old["url"].as_str().unwrap().to_owned()).await);
        assert_eq!(api.permissions(&p.user(&ns)).await.unwrap(), p.grant(&ns));
    }
}

/// A deployment from nothing, as compose.yaml runs one: `vigil broker bootstrap` writes the
/// broker's first administrator into its configuration and into files; `vigil broker
/// provision --out` makes each service's user and writes each URL to a file of its own; the
/// real binaries then run with separate roles, each reading only its own file
/// (VIGIL_AMQP_URL_FILE). No password is printed, nor passed in the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_from_nothing_runs_on_secret_files() {
    use std::os::unix::fs::PermissionsExt as _;
    let env = TestEnv::new("files");
    let ns = env.cfg.namespace.clone();
    let secrets = crate::support::TempDir(
        std::env::temp_dir().join(format!("vigil-secrets-{:016x}", rand::random::<u64>())),
    );
    std::fs::create_dir_all(&secrets.0).unwrap();
    let boot = secrets.0.join("bootstrap");
    let users = secrets.0.join("users");
    let vigil = env!("CARGO_BIN_EXE_vigil");
    let (rabbit, _) = PrivateBroker::start_with_management_conf(|amqp, management| {
        let out = crate::support::output(std::process::Command::new(vigil).args([
            "broker",
            "bootstrap",
            "--out",
            boot.to_str().unwrap(),
            "--host",
            "127.0.0.1",
            "--amqp-port",
            &amqp.to_string(),
            "--management-port",
            &management.to_string(),
        ]));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            std::fs::read_to_string(boot.join("rabbitmq/10-vigil-bootstrap.conf")).unwrap(),
            Some(
                std::fs::read_to_string(boot.join("admin/amqp.url"))
                    .unwrap()
                    .trim()
                    .to_owned(),
            ),
        )
    })
    .await;
    let provision = || {
        let mut cmd = std::process::Command::new(vigil);
        cmd.args([
            "broker",
            "provision",
            "--via",
            "management",
            "--edge",
            "e1",
            "--out",
            users.to_str().unwrap(),
            "--if-missing",
        ])
        .env("VIGIL_NAMESPACE", &ns)
        .env("VIGIL_AMQP_URL_FILE", boot.join("admin/amqp.url"))
        .env(
            "VIGIL_BROKER_MANAGEMENT_URL_FILE",
            boot.join("admin/management.url"),
        );
        let out = crate::support::output(&mut cmd);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let report = provision();
    assert!(
        !report.contains("amqp://"),
        "no URL, so no password, in the report: {report}"
    );
    let file = |user: &str| users.join(user).join("amqp.url");
    for user in ["worker", "audit", "operator", "admin", "edge-e1"] {
        let path = file(&format!("{ns}-{user}"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    }
    let first = std::fs::read_to_string(file(&format!("{ns}-worker"))).unwrap();
    // A later start keeps them (running services hold these passwords).
    assert!(provision().contains("kept"));
    assert_eq!(
        std::fs::read_to_string(file(&format!("{ns}-worker"))).unwrap(),
        first
    );

    // The services, each with its own file; the edge's id is its user's.
    let evidence = secrets.0.join("evidence");
    let edge_port = crate::support::free_port();
    let spawn = |binary: &str, user: &str, extra: &[(&str, String)]| {
        let mut cmd = std::process::Command::new(binary);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env("VIGIL_NAMESPACE", &ns)
            .env("VIGIL_BROKER_ROLES", "separate")
            .env("VIGIL_AMQP_URL_FILE", file(&format!("{ns}-{user}")))
            .env("VIGIL_METRICS_LISTEN", "127.0.0.1:0");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        crate::support::KillOnDrop(cmd.spawn().expect("the service starts"))
    };
    // The writer signs, as compose has it, with a key made by `vigil audit keygen`.
    let key = secrets.0.join("audit-key").join("audit.key");
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    let made = crate::support::output(
        std::process::Command::new(env!("CARGO_BIN_EXE_vigil")).args([
            "audit",
            "keygen",
            "--out",
            key.to_str().unwrap(),
        ]),
    );
    assert!(made.status.success(), "{made:?}");
    let _audit = spawn(
        env!("CARGO_BIN_EXE_vigil-audit"),
        "audit",
        &[
            ("VIGIL_EVIDENCE_DIR", evidence.display().to_string()),
            ("VIGIL_AUDIT_KEY", key.display().to_string()),
        ],
    );
    let _worker = spawn(
        env!("CARGO_BIN_EXE_vigil-worker"),
        "worker",
        &[("VIGIL_ANALYZER", "frame-info".into())],
    );
    let _edge = spawn(
        env!("CARGO_BIN_EXE_vigil-edge"),
        "edge-e1",
        &[
            ("VIGIL_EDGE_LISTEN", format!("127.0.0.1:{edge_port}")),
            ("VIGIL_CLIENTS_DIR", env.clients_dir.display().to_string()),
            ("VIGIL_CHALLENGE_ON_START", "false".into()),
        ],
    );
    env.add_client("c1");
    let url = format!("ws://127.0.0.1:{edge_port}/v1/stream");
    crate::support::await_listening(&url).await;
    let (mut conn, welcome) = Connection::connect(&url, "c1", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    assert!(matches!(welcome, ServerMsg::Welcome { .. }), "{welcome:?}");
    conn.send_frame(1, 0, &synthetic_jpeg(64, 48, 1, 0))
        .await
        .unwrap();
    let answer = next_msg(&mut conn).await;
    assert!(
        matches!(answer, ServerMsg::Result { seq: 1, .. }),
        "{answer:?}"
    );
    // The edge announced the session as itself, and the writer, as the audit role, kept it.
    let notes = eventually("the session in the trail", Duration::from_secs(20), || {
        let evidence = evidence.clone();
        async move {
            vigil::audit::notes(&evidence).ok().and_then(|n| {
                n.into_iter().find(
                    |n| matches!(n, vigil::audit::Note::Session { source, .. } if source == "e1"),
                )
            })
        }
    })
    .await;
    assert!(matches!(notes, vigil::audit::Note::Session { .. }));
    // ...signed: the trail holds under the public key.
    let public = vigil::audit::signing::load_public(&key.with_extension("key.pub")).unwrap();
    assert!(matches!(
        vigil::audit::verify(&evidence, Some(&public)).unwrap(),
        vigil::audit::Verification::Intact { .. }
    ));
    conn.close().await;
    // The services go before their broker.
    drop((_edge, _worker, _audit));
    drop(rabbit);
}
