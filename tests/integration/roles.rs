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
    let url = |role: &str| -> String {
        users
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["role"] == role)
            .and_then(|u| u["url"].as_str())
            .unwrap_or_else(|| panic!("no {role} user in {users}"))
            .to_owned()
    };
    let ns = env.cfg.namespace.clone();
    let listed = rabbit.ctl_output(&["list_users", "--silent"]);
    for role in ["edge", "worker", "audit", "admin"] {
        assert!(listed.contains(&format!("{ns}-{role}")), "{listed}");
    }

    // Every service as its own role.
    env.cfg.broker_roles = RoleMode::Separate;
    env.cfg.amqp_url = url("edge");
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
    publish(&guest, &format!("{ns}.control"), "", &block)
        .await
        .unwrap();
    eventually(
        "forged control counted",
        Duration::from_secs(10),
        || async { (untrusted(edge_registry, "control") >= 1.0).then_some(()) },
    )
    .await;
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
    publish(&guest, &format!("{ns}.actions"), "", &action)
        .await
        .unwrap();
    eventually("forged action counted", Duration::from_secs(10), || async {
        (untrusted(&audit_registry, "action") >= 1.0).then_some(())
    })
    .await;
    assert!(
        vigil::audit::records(&env.cfg.evidence_dir)
            .unwrap()
            .is_empty()
    );

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

    for b in [guest, worker, admin] {
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
    use vigil::roles::{Role, grant, user_of};
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
        let (api, users) = (api.clone(), Role::ALL.map(|r| user_of(&ns, r)).to_vec());
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

    let first = provision();
    assert_eq!(first.len(), Role::ALL.len(), "{first:?}");
    for role in Role::ALL {
        let user = user_of(&ns, role);
        let entry = first
            .iter()
            .find(|u| u["role"] == role.as_str())
            .unwrap_or_else(|| panic!("no {role:?} user in {first:?}"));
        assert_eq!(entry["user"], user.as_str());
        assert_eq!(entry["created"], true, "{entry}");
        let url = entry["url"].as_str().unwrap().to_owned();
        assert!(can_connect(url).await, "{user} connects with its password");
        assert_eq!(api.permissions(&user).await.unwrap(), grant(&ns, role));
        let shown = api.user(&user).await.unwrap();
        assert_eq!(shown["tags"], serde_json::json!([]), "{shown}");
    }
    // The topology was declared as the admin user.
    let admin = first.iter().find(|u| u["role"] == "admin").unwrap();
    let admin_broker = connect(admin["url"].as_str().unwrap()).await;
    admin_broker.close().await;

    // Again: the same users, new passwords; the old ones no longer work.
    let second = provision();
    for role in Role::ALL {
        let pick = |all: &[serde_json::Value]| {
            all.iter()
                .find(|u| u["role"] == role.as_str())
                .unwrap()
                .clone()
        };
        let (old, new) = (pick(&first), pick(&second));
        assert_eq!(new["created"], false, "{new}");
        assert_ne!(old["password"], new["password"]);
        assert!(can_connect(new["url"].as_str().unwrap().to_owned()).await);
        assert!(!can_connect(old["url"].as_str().unwrap().to_owned()).await);
        assert_eq!(
            api.permissions(&user_of(&ns, role)).await.unwrap(),
            grant(&ns, role)
        );
    }
}
