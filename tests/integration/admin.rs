//! The admin control plane across two edges on the real broker: block, pause, one session per
//! client, the API's token, admission control, and connection status.

use std::time::{Duration, Instant};

use vigil::edge::client::{Connection, Incoming};
use vigil::inference::synthetic_jpeg;
use vigil::wire::DropReason;
use vigil::wire::client::{Encoding, ErrorCode, ServerMsg};

use crate::support::{TOKEN, TestEnv, eventually, http, metric, spawn_worker_process};

const ADMIN_TOKEN: &str = "admin-token-0123456789";

fn with_admin_api(env: &mut TestEnv) {
    env.cfg.edge.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    env.cfg.edge.admin_token = Some(ADMIN_TOKEN.into());
}

async fn next(conn: &mut Connection) -> Incoming {
    tokio::time::timeout(Duration::from_secs(10), conn.recv())
        .await
        .expect("a message in time")
        .expect("socket open")
        .expect("well-formed message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_blocked_through_one_edge_is_closed_on_the_other_within_a_second() {
    let mut env = TestEnv::new("block");
    with_admin_api(&mut env);
    let _url1 = env.start_edge("edge-1").await;
    let url2 = env.start_edge("edge-2").await;
    env.add_client("c1");
    let (mut conn, _) = Connection::connect(&url2, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    let admin = env.edges[0].admin_addr.expect("admin API on");

    let started = Instant::now();
    let (status, body) = http(
        admin,
        "POST",
        "/v1/admin/clients/c1/block",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"status\":\"blocked\""), "{body}");
    assert!(matches!(
        next(&mut conn).await,
        Incoming::Msg(ServerMsg::Error {
            code: ErrorCode::Blocked,
            ..
        })
    ));
    assert!(matches!(
        next(&mut conn).await,
        Incoming::Closed { code: 4403, .. }
    ));
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(1), "closed after {elapsed:?}");
    println!("block applied on the other edge in {elapsed:?}");

    // A new connection is refused, on either edge.
    let mut again = Connection::open(&url2, Encoding::Json).await.unwrap();
    again.send_hello("c1", TOKEN).await.unwrap();
    assert!(matches!(
        next(&mut again).await,
        Incoming::Msg(ServerMsg::Error {
            code: ErrorCode::Blocked,
            ..
        })
    ));
    assert!(matches!(
        next(&mut again).await,
        Incoming::Closed { code: 4403, .. }
    ));
    // Unblocked, it may come back.
    let (status, _) = http(
        admin,
        "POST",
        "/v1/admin/clients/c1/unblock",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    Connection::connect(&url2, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_client_gets_no_results_until_resumed() {
    let mut env = TestEnv::new("pause");
    with_admin_api(&mut env);
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    env.add_client("c1");
    let admin = env.edges[0].admin_addr.unwrap();
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    let jpeg = synthetic_jpeg(64, 48, 1, 0);

    let (status, _) = http(
        admin,
        "POST",
        "/v1/admin/clients/c1/pause",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        matches!(next(&mut conn).await, Incoming::Msg(ServerMsg::Status { state }) if state == "paused")
    );
    for seq in 1..=5 {
        conn.send_frame(seq, 0, &jpeg).await.unwrap();
        match next(&mut conn).await {
            Incoming::Msg(ServerMsg::Dropped {
                seq: s,
                reason: DropReason::Paused,
                ..
            }) => assert_eq!(s, seq),
            other => panic!("a paused client got {other:?}"),
        }
    }
    let (status, _) = http(
        admin,
        "POST",
        "/v1/admin/clients/c1/resume",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        matches!(next(&mut conn).await, Incoming::Msg(ServerMsg::Status { state }) if state == "active")
    );
    conn.send_frame(6, 0, &jpeg).await.unwrap();
    assert!(matches!(
        next(&mut conn).await,
        Incoming::Msg(ServerMsg::Result { seq: 6, .. })
    ));
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_on_another_edge_ends_the_older_session() {
    let mut env = TestEnv::new("dupsession");
    let url1 = env.start_edge("edge-1").await;
    let url2 = env.start_edge("edge-2").await;
    env.start_worker("w1").await;
    env.add_client("c1");
    let (mut older, _) = Connection::connect(&url1, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    let (mut newer, _) = Connection::connect(&url2, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    assert!(matches!(
        next(&mut older).await,
        Incoming::Msg(ServerMsg::Error {
            code: ErrorCode::DuplicateSession,
            ..
        })
    ));
    assert!(matches!(
        next(&mut older).await,
        Incoming::Closed { code: 4409, .. }
    ));
    newer
        .send_frame(1, 0, &synthetic_jpeg(64, 48, 1, 0))
        .await
        .unwrap();
    assert!(matches!(
        next(&mut newer).await,
        Incoming::Msg(ServerMsg::Result { seq: 1, .. })
    ));
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_its_token() {
    let mut env = TestEnv::new("apitoken");
    with_admin_api(&mut env);
    env.start_edge("e1").await;
    env.add_client("c1");
    let admin = env.edges[0].admin_addr.unwrap();
    for token in [None, Some("wrong-token-0123456789"), Some("")] {
        for (method, path) in [
            ("GET", "/v1/admin/clients"),
            ("POST", "/v1/admin/clients/c1/block"),
            ("GET", "/v1/admin/sessions"),
        ] {
            let (status, _) = http(admin, method, path, token, None).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}");
        }
        // Authentication comes before the body is read: garbage without the token is a 401,
        // not a JSON error.
        let (status, _) = http(admin, "POST", "/v1/admin/clients", token, Some("{not json")).await;
        assert_eq!(
            status, 401,
            "a body parsed before authentication with {token:?}"
        );
    }
    let (status, body) = http(admin, "GET", "/v1/admin/clients", Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("\"id\":\"c1\"") && body.contains("\"status\":\"active\""),
        "{body}"
    );
    let (status, body) = http(
        admin,
        "POST",
        "/v1/admin/clients",
        Some(ADMIN_TOKEN),
        Some(r#"{"id":"c2","token":"token-of-c2-000","name":"Second"}"#),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert!(
        !body.contains("token-of-c2-000"),
        "a chosen token is never echoed: {body}"
    );
    // Without a token, the API generates one (256 bits) and shows it this once; it works.
    let (status, body) = http(
        admin,
        "POST",
        "/v1/admin/clients",
        Some(ADMIN_TOKEN),
        Some(r#"{"id":"c3","name":"Third"}"#),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let generated: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = generated["token"]
        .as_str()
        .expect("the generated token")
        .to_owned();
    assert_eq!(token.len(), 43);
    let store = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    assert!(
        vigil::directory::authenticate(
            &store,
            "c3",
            &vigil::directory::Credential::Token(token.clone())
        )
        .is_ok()
    );
    let stored = std::fs::read_to_string(env.clients_dir.join("c3.json")).unwrap();
    assert!(
        !stored.contains(&token) && stored.contains("$argon2id$"),
        "{stored}"
    );
    assert_eq!(
        http(
            admin,
            "GET",
            "/v1/admin/clients/nobody",
            Some(ADMIN_TOKEN),
            None
        )
        .await
        .0,
        404
    );
    // Without a token configured, the API is off.
    let mut quiet = TestEnv::new("apioff");
    quiet.cfg.edge.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    quiet.start_edge("e1").await;
    assert!(quiet.edges[0].admin_addr.is_none());
    quiet.teardown().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_system_refuses_new_sessions_and_throttles_live_ones() {
    let mut env = TestEnv::new("full");
    with_admin_api(&mut env);
    env.cfg.edge.max_backlog = 2;
    env.cfg.edge.admission_poll_ms = 100;
    env.cfg.edge.max_inflight = 4;
    env.cfg.edge.throttle_fps = 3;
    let url = env.start_edge("e1").await;
    let _slow = spawn_worker_process(
        &env,
        "slow",
        &[
            ("VIGIL_ANALYZER", "delay"),
            ("VIGIL_DELAY_MS", "300"),
            ("VIGIL_WORKER_ANALYSIS_THREADS", "1"),
            ("VIGIL_WORKER_PREFETCH", "1"),
        ],
    );
    crate::support::await_consumers(&env, 1).await;
    let jpeg = synthetic_jpeg(64, 48, 1, 0);
    let mut live = Vec::new();
    for i in 0..3 {
        let id = format!("live{i}");
        env.add_client(&id);
        let (conn, _) = Connection::connect(&url, &id, TOKEN, Encoding::MsgPack)
            .await
            .unwrap();
        live.push(conn);
    }
    for conn in &mut live {
        for seq in 1..=4 {
            conn.send_frame(seq, 0, &jpeg).await.unwrap();
        }
    }
    // The backlog passes 2: every live client is throttled.
    for conn in &mut live {
        let max_fps = loop {
            match next(conn).await {
                Incoming::Msg(ServerMsg::Throttle { max_fps }) => break max_fps,
                Incoming::Msg(ServerMsg::Result { .. } | ServerMsg::Dropped { .. }) => continue,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(max_fps, 3);
    }
    assert_eq!(
        metric(&env.edge_registries[0], "vigil_edge_system_full", None),
        1.0
    );
    // And a new session is refused.
    env.add_client("late");
    let mut late = Connection::open(&url, Encoding::Json).await.unwrap();
    late.send_hello("late", TOKEN).await.unwrap();
    assert!(matches!(
        next(&mut late).await,
        Incoming::Msg(ServerMsg::Error {
            code: ErrorCode::SystemFull,
            ..
        })
    ));
    assert!(matches!(
        next(&mut late).await,
        Incoming::Closed { code: 4503, .. }
    ));
    assert!(
        metric(
            &env.edge_registries[0],
            "vigil_edge_sessions_refused_total",
            Some(("reason", "system_full"))
        ) >= 1.0
    );
    let mut slow = _slow;
    crate::support::sigterm(&slow);
    crate::support::exit_status(&mut slow);
    env.teardown().await;
}

/// (client id, connection) pairs.
type Rows = Vec<(String, String)>;

/// `vigil clients list` as an operator runs it: (id, connection) pairs, read from the table a
/// person reads and from the same list as JSON (`--json`). Two runs, so the two agree only once
/// the presences stopped changing: the caller compares each with what it expects.
fn cli_list(clients_dir: &std::path::Path) -> (Rows, Rows) {
    let list = |json: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"));
        cmd.args(["clients", "list"])
            .env("VIGIL_CLIENTS_DIR", clients_dir);
        if json {
            cmd.arg("--json");
        }
        let out = crate::support::output(&mut cmd);
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table: Vec<(String, String)> = list(false)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some((cols.first()?.to_string(), cols.get(2)?.to_string()))
        })
        .collect();
    let json: Vec<serde_json::Value> = serde_json::from_str(&list(true)).unwrap();
    let from_json: Vec<(String, String)> = json
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_owned(),
                c["connection"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (table, from_json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_list_shows_who_is_connected_gone_or_dropped() {
    let mut env = TestEnv::new("presence");
    let url = env.start_edge("e1").await;
    for id in ["connected", "closed", "dropped", "never"] {
        env.add_client(id);
    }
    let (_connected, _) = Connection::connect(&url, "connected", TOKEN, Encoding::Json)
        .await
        .unwrap();
    let (closed, _) = Connection::connect(&url, "closed", TOKEN, Encoding::Json)
        .await
        .unwrap();
    closed.close().await;
    let (dropped, _) = Connection::connect(&url, "dropped", TOKEN, Encoding::Json)
        .await
        .unwrap();
    drop(dropped); // no close handshake
    let want = |id: &str, c: &str| (id.to_string(), c.to_string());
    let expected = vec![
        want("closed", "deactivated"),
        want("connected", "active"),
        want("dropped", "connection_error"),
        want("never", "deactivated"),
    ];
    // Both the table and the JSON show every client as expected. Each check runs the CLI on a
    // blocking thread, so the deadline holds even if a run hangs; the failure message shows the
    // last lists read.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    loop {
        let dir = env.clients_dir.clone();
        let read = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            tokio::task::spawn_blocking(move || cli_list(&dir)),
        )
        .await;
        match read {
            Ok(Ok((table, json))) => {
                if table == expected && json == expected {
                    break;
                }
                last = Some((table, json));
            }
            // The CLI failed: its own assertion says why.
            Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {} // the deadline passed during this run
        }
        assert!(
            Instant::now() < deadline,
            "presence not recorded within 10 s: (table, --json) last read {last:?}, expected \
             {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_action_reaches_the_client_and_the_audit_trail() {
    let mut env = TestEnv::new("force");
    with_admin_api(&mut env);
    env.cfg.evidence_dir =
        std::env::temp_dir().join(format!("vigil-{}-evidence", env.cfg.namespace));
    let url = env.start_edge("e1").await;
    env.add_client("c1");
    let writer = vigil::audit::start(
        env.cfg.clone(),
        prometheus::Registry::new(),
        env.shutdown.clone(),
    )
    .await
    .unwrap();
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    let admin = env.edges[0].admin_addr.unwrap();
    let (status, body) = http(
        admin,
        "POST",
        "/v1/admin/clients/c1/action",
        Some(ADMIN_TOKEN),
        Some(r#"{"action":"sign_out"}"#),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let action_id = match next(&mut conn).await {
        Incoming::Msg(ServerMsg::Action {
            action,
            reason,
            action_id,
            ..
        }) => {
            assert_eq!(
                (action, reason.as_str()),
                (vigil::policy::Action::SignOut, "admin")
            );
            action_id
        }
        other => panic!("expected the forced action, got {other:?}"),
    };
    let dir = env.cfg.evidence_dir.clone();
    let records = eventually("the audited forced action", Duration::from_secs(10), || {
        let dir = dir.clone();
        async move { vigil::audit::records(&dir).ok().filter(|r| !r.is_empty()) }
    })
    .await;
    assert_eq!(records[0].action_id.to_string(), action_id);
    assert_eq!(records[0].origin, "admin");
    env.shutdown.cancel();
    writer.join().await.unwrap();
    env.teardown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vigil operators ...` on the tokens file; the token it printed, for `add`.
/// `vigil <args>` as the operator `root-cli`, with the test's broker and namespace (changes to
/// operators and identities are audited, so the CLI needs the broker); its output.
fn cli(env: &TestEnv, file: &std::path::Path, args: &[&str]) -> String {
    let out = crate::support::output(
        std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(args)
            .env("RUST_LOG", "warn")
            .env("VIGIL_OPERATOR", "root-cli")
            .env("VIGIL_NAMESPACE", &env.cfg.namespace)
            .env("VIGIL_AMQP_URL", &env.cfg.amqp_url)
            .env("VIGIL_CLIENTS_DIR", &env.clients_dir)
            .env("VIGIL_ADMIN_TOKENS_FILE", file),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `vigil operators <args>`; the token it printed, if any.
fn operators_cli(env: &TestEnv, file: &std::path::Path, args: &[&str]) -> String {
    let mut all = vec!["operators"];
    all.extend_from_slice(args);
    cli(env, file, &all)
        .lines()
        .find_map(|l| l.split_once("now): ").map(|(_, t)| t.trim().to_owned()))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_operator_has_a_token_and_a_role_and_every_identity_change_is_audited() {
    let mut env = TestEnv::new("operators");
    let file = env.clients_dir.with_extension("operators.json");
    let alice = operators_cli(&env, &file, &["add", "alice", "--role", "admin"]);
    let bob = operators_cli(&env, &file, &["add", "bob"]);
    let vera = operators_cli(&env, &file, &["add", "vera", "--role", "viewer"]);
    assert_eq!((alice.len(), bob.len(), vera.len()), (43, 43, 43));
    env.cfg.edge.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    env.cfg.edge.admin_tokens_file = Some(file.clone());
    env.cfg.evidence_dir = env.clients_dir.join("evidence");
    env.start_edge("e1").await;
    let writer = vigil::audit::start(
        env.cfg.clone(),
        prometheus::Registry::new(),
        env.shutdown.clone(),
    )
    .await
    .unwrap();
    let admin = env.edges[0].admin_addr.unwrap();
    let call =
        |token: &str, method: &'static str, path: &'static str, body: Option<&'static str>| {
            let token = token.to_owned();
            async move { http(admin, method, path, Some(&token), body).await }
        };

    let (status, body) = call(
        &alice,
        "POST",
        "/v1/admin/clients",
        Some(r#"{"id":"c2","name":"Candidate two"}"#),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // A viewer reads, and is refused every change and every biometric read.
    let (status, body) = call(&vera, "POST", "/v1/admin/clients/c2/block", None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("`vera` is a viewer"), "{body}");
    let (status, _) = call(&vera, "GET", "/v1/admin/clients", None).await;
    assert_eq!(status, 200);
    let (status, body) = call(&vera, "GET", "/v1/admin/me", None).await;
    assert_eq!(
        (status, body.contains(r#""role":"viewer""#)),
        (200, true),
        "{body}"
    );
    let (status, _) = call(&vera, "GET", "/v1/admin/clients/c2/reference.jpg", None).await;
    assert_eq!(status, 403);
    // A proctor acts on candidates, and may not add them.
    let (status, _) = call(
        &bob,
        "POST",
        "/v1/admin/clients",
        Some(r#"{"id":"c3","name":"x"}"#),
    )
    .await;
    assert_eq!(status, 403);
    // Spelled with an escape, a removal is still an admin's.
    let (status, body) = call(&bob, "POST", "/v1/admin/clients/c2/%72emove", None).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = call(&bob, "POST", "/v1/admin/clients/c2/block", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = call("not-a-token", "GET", "/v1/admin/clients", None).await;
    assert_eq!(status, 401);
    assert_eq!(
        crate::support::metric(
            &env.edge_registries[0],
            "vigil_edge_admin_forbidden_total",
            Some(("role", "viewer"))
        ),
        2.0
    );

    // An enrolment from the CLI is in the trail, with its photos' and templates' hashes.
    let photo = crate::identity::photos().join("Male_41_2_4_1.jpg");
    let text = cli(
        &env,
        &file,
        &[
            "clients",
            "enroll",
            "c2",
            "--reference",
            photo.to_str().unwrap(),
        ],
    );
    assert!(text.contains("enrolled"), "{text}");
    // The proctor looks at the reference photo: that read is in the trail too.
    let (status, _) = call(&bob, "GET", "/v1/admin/clients/c2/reference.jpg", None).await;
    assert_eq!(status, 200);

    // A removed operator's token stops working at the next request.
    operators_cli(&env, &file, &["remove", "bob"]);
    let (status, _) = call(&bob, "GET", "/v1/admin/clients", None).await;
    assert_eq!(status, 401);
    let (status, _) = call(&alice, "GET", "/v1/admin/clients", None).await;
    assert_eq!(status, 200);

    // An import that replaces c2 and adds c9 is in the trail before it is made.
    let exported = cli(&env, &file, &["directory", "export"]);
    let c2_line = exported
        .lines()
        .find(|l| l.contains(r#""id":"c2""#))
        .unwrap()
        .to_owned();
    let import = env.clients_dir.with_extension("import.jsonl");
    std::fs::write(
        &import,
        format!(
            "{c2_line}\n{}\n",
            c2_line.replace(r#""id":"c2""#, r#""id":"c9""#)
        ),
    )
    .unwrap();
    let text = cli(
        &env,
        &file,
        &["directory", "import", import.to_str().unwrap(), "--replace"],
    );
    assert!(text.contains("1 added, 1 replaced"), "{text}");
    // An import that names a client twice is refused whole, before anything is audited.
    std::fs::write(&import, format!("{c2_line}\n{c2_line}\n")).unwrap();
    let twice = crate::support::output(
        std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(["directory", "import", import.to_str().unwrap(), "--replace"])
            .env("RUST_LOG", "warn")
            .env("VIGIL_NAMESPACE", &env.cfg.namespace)
            .env("VIGIL_AMQP_URL", &env.cfg.amqp_url)
            .env("VIGIL_CLIENTS_DIR", &env.clients_dir),
    );
    assert!(!twice.status.success());
    assert!(
        String::from_utf8_lossy(&twice.stderr).contains("twice"),
        "{}",
        String::from_utf8_lossy(&twice.stderr)
    );
    // With no broker to take the entry, nothing is imported.
    std::fs::write(
        &import,
        c2_line.replace(r#""id":"c2""#, r#""id":"c10""#) + "\n",
    )
    .unwrap();
    let refused = crate::support::output(
        std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(["directory", "import", import.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .env("VIGIL_NAMESPACE", &env.cfg.namespace)
            .env("VIGIL_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
            .env("VIGIL_BROKER_CONNECT_TIMEOUT_MS", "2000")
            .env("VIGIL_CLIENTS_DIR", &env.clients_dir),
    );
    assert!(!refused.status.success());
    let (status, _) = call(&alice, "GET", "/v1/admin/clients/c10", None).await;
    assert_eq!(status, 404, "c10 was not imported");
    let (status, _) = call(&alice, "GET", "/v1/admin/clients/c9", None).await;
    assert_eq!(status, 200, "c9 was");
    let _ = std::fs::remove_file(&import);

    let dir = env.cfg.evidence_dir.clone();
    let notes = eventually(
        "every operation in the trail",
        Duration::from_secs(20),
        || {
            let dir = dir.clone();
            async move {
                vigil::audit::notes(&dir).ok().filter(|n| {
                    n.iter()
                        .filter(|x| matches!(x, vigil::audit::Note::Admin { .. }))
                        .count()
                        >= 12
                })
            }
        },
    )
    .await;
    let seen: Vec<(String, String, String, String)> = notes
        .iter()
        .filter_map(|n| match n {
            vigil::audit::Note::Admin {
                operator,
                operation,
                client_id,
                source,
                ..
            } => Some((
                operator.clone(),
                operation.clone(),
                client_id.clone(),
                source.clone(),
            )),
            _ => None,
        })
        .collect();
    let row = |o: &str, op: &str, c: &str, s: &str| {
        (o.to_owned(), op.to_owned(), c.to_owned(), s.to_owned())
    };
    assert_eq!(
        seen,
        [
            row("root-cli", "operator:add", "", "cli"),
            row("root-cli", "operator:add", "", "cli"),
            row("root-cli", "operator:add", "", "cli"),
            row("alice", "add", "c2", "e1"),
            row("bob", "block", "c2", "e1"),
            row("root-cli", "enroll", "c2", "cli"),
            row("bob", "read:reference", "c2", "e1"),
            row("root-cli", "operator:remove", "", "cli"),
            row("root-cli", "directory:import", "", "cli"),
            row("root-cli", "import:replace", "c2", "cli"),
            row("root-cli", "import:add", "c9", "cli"),
            row("root-cli", "directory:import:done", "", "cli"),
        ]
    );
    let details: Vec<&str> = notes
        .iter()
        .filter_map(|n| match n {
            vigil::audit::Note::Admin { detail, .. } => Some(detail.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(details[2], "operator=vera role=viewer");
    let photo_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        std::fs::read(&photo).unwrap(),
    ));
    assert!(
        details[5].starts_with(&format!(
            "photos={photo_sha} template_old=none template_new="
        )),
        "{}",
        details[5]
    );
    assert!(details[8].contains("add=1 replace=1"), "{}", details[8]);
    assert!(details[9].starts_with("record_sha256="), "{}", details[9]);
    // The photo's hash is the JPEG's, as the CLI enrolment recorded it.
    let enrolled_photo = details[5]
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("photos="))
        .unwrap();
    assert!(
        details[9].contains(&format!("photo_sha256={enrolled_photo}")),
        "{} vs {}",
        details[9],
        details[5]
    );
    assert_eq!(details[11], "added=1 replaced=1 kept=0");
    assert_eq!(
        vigil::audit::verify(&dir, None).unwrap(),
        vigil::audit::Verification::Intact { entries: 12 }
    );
    env.shutdown.cancel();
    writer.join().await.unwrap();
    env.teardown().await;
    let _ = std::fs::remove_file(&file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_sees_the_sessions_of_every_edge() {
    let mut env = TestEnv::new("twoedges");
    with_admin_api(&mut env);
    let first = env.start_edge("e1").await;
    // The second edge serves no admin API: the first one's console still shows its sessions.
    env.cfg.edge.admin_listen = None;
    let second = env.start_edge("e2").await;
    env.start_worker("w1").await;
    env.add_client("on-one");
    env.add_client("on-two");
    let mut streams = Vec::new();
    for (url, id) in [(&first, "on-one"), (&second, "on-two")] {
        let (mut conn, _) = Connection::connect(url, id, TOKEN, Encoding::MsgPack)
            .await
            .unwrap();
        for seq in 1..=3 {
            conn.send_frame(seq, 0, &synthetic_jpeg(64, 48, 1, 0))
                .await
                .unwrap();
            assert!(matches!(
                next(&mut conn).await,
                Incoming::Msg(ServerMsg::Result { .. })
            ));
        }
        streams.push(conn);
    }
    let admin = env.edges[0].admin_addr.unwrap();
    // What the console lists: both clients live, each on its own edge, with its frame rate.
    let rows = eventually(
        "both edges' sessions",
        Duration::from_secs(15),
        || async move {
            let (status, body) =
                http(admin, "GET", "/v1/admin/clients", Some(ADMIN_TOKEN), None).await;
            let rows: Vec<serde_json::Value> = serde_json::from_str(&body).ok()?;
            let live = |id: &str, edge: &str| {
                rows.iter().any(|r| {
                    r["id"] == id
                        && r["connection"] == "active"
                        && r["edge"] == edge
                        && r["fps"].as_f64().is_some_and(|f| f > 0.0)
                })
            };
            (status == 200 && live("on-one", "e1") && live("on-two", "e2")).then_some(rows)
        },
    )
    .await;
    assert_eq!(rows.len(), 2);
    for conn in streams {
        conn.close().await;
    }
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_fired_as_the_edge_gets_sigterm_reaches_the_audit_queue() {
    let env = TestEnv::new("termaction");
    env.add_client("c1");
    let admin_port = crate::support::free_port();
    let admin_listen = format!("127.0.0.1:{admin_port}");
    let (mut edge, url) = crate::support::spawn_edge_process(
        &env,
        "term-edge",
        &[
            ("VIGIL_ADMIN_LISTEN", admin_listen.as_str()),
            ("VIGIL_ADMIN_TOKEN", ADMIN_TOKEN),
        ],
    );
    crate::support::await_listening(&url).await;
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    let admin: std::net::SocketAddr = admin_listen.parse().unwrap();
    let (status, body) = http(
        admin,
        "POST",
        "/v1/admin/clients/c1/action",
        Some(ADMIN_TOKEN),
        Some(r#"{"action":"lock_screen"}"#),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    // The moment the client has its action, the edge is told to stop: the action's way to
    // the audit queue (a publish and its confirm) is still under way.
    let action_id = match next(&mut conn).await {
        Incoming::Msg(ServerMsg::Action { action_id, .. }) => action_id,
        other => panic!("expected the forced action, got {other:?}"),
    };
    crate::support::sigterm(&edge);
    assert!(crate::support::exit_status(&mut edge).success());

    // No audit writer ran meanwhile: what the edge handed over waited in the audit queue, and
    // a writer started now logs it.
    let mut cfg = env.cfg.clone();
    cfg.evidence_dir = env.clients_dir.join("evidence");
    let writer = vigil::audit::start(
        cfg.clone(),
        prometheus::Registry::new(),
        env.shutdown.clone(),
    )
    .await
    .unwrap();
    let dir = cfg.evidence_dir.clone();
    eventually(
        "the action fired at shutdown, audited",
        Duration::from_secs(20),
        || {
            let (dir, action_id) = (dir.clone(), action_id.clone());
            async move {
                let records = vigil::audit::records(&dir).ok()?;
                records
                    .iter()
                    .any(|r| r.action_id.to_string() == action_id)
                    .then_some(())
            }
        },
    )
    .await;
    env.shutdown.cancel();
    writer.join().await.unwrap();
    env.teardown().await;
}

/// The client list comes in pages (following `Link: rel="next"`), filtered by status, with
/// the presence looked up for the page only; and the API describes itself as OpenAPI 3.1,
/// without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_list_comes_in_pages_and_the_api_describes_itself() {
    let mut env = TestEnv::new("pages");
    with_admin_api(&mut env);
    let _url = env.start_edge("e1").await;
    for i in 0..7 {
        env.add_client(&format!("p{i}"));
    }
    let admin = env.edges[0].admin_addr.unwrap();
    let (status, _) = http(
        admin,
        "POST",
        "/v1/admin/clients/p3/block",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    vigil::telemetry::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let base = format!("http://{admin}");
    let get = |path: String| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            client
                .get(format!("{base}{path}"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
        }
    };

    // Pages of three, in id order, to the end.
    let mut seen = Vec::new();
    let mut path = "/v1/admin/clients?limit=3".to_owned();
    let mut pages = 0;
    loop {
        let res = get(path.clone()).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-total-count"], "7");
        let link = res
            .headers()
            .get("link")
            .map(|v| v.to_str().unwrap().to_owned());
        let page: Vec<serde_json::Value> = res.json().await.unwrap();
        assert!(page.len() <= 3);
        seen.extend(page.iter().map(|c| c["id"].as_str().unwrap().to_owned()));
        pages += 1;
        match link {
            Some(l) => {
                assert!(l.ends_with(r#">; rel="next""#), "{l}");
                path = l[1..l.find('>').unwrap()].to_owned();
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, (0..7).map(|i| format!("p{i}")).collect::<Vec<_>>());

    // Filtered by status.
    let res = get("/v1/admin/clients?status=blocked".into()).await;
    assert_eq!(res.headers()["x-total-count"], "1");
    let blocked: Vec<serde_json::Value> = res.json().await.unwrap();
    assert_eq!(blocked.len(), 1);
    assert_eq!(blocked[0]["id"], "p3");

    // Bad queries are refused, with a reason.
    for bad in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "status=gone",
        "after=../x",
        "other=1",
    ] {
        let res = get(format!("/v1/admin/clients?{bad}")).await;
        assert_eq!(res.status(), 400, "{bad}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert!(body["error"].is_string(), "{bad}: {body}");
    }

    // The description: no token needed, OpenAPI 3.1, the list's parameters in it.
    let res = client
        .get(format!("{base}/v1/admin/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let doc: serde_json::Value = res.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let params: Vec<&str> = doc["paths"]["/v1/admin/clients"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(params, ["limit", "after", "status"]);
    // ...and every operation it describes is served, behind the token: without one, each
    // (method, path) is refused by the real router.
    let mut operations = 0;
    for (path, methods) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{id}", "p1")
            .replace("{op}", "pause")
            .replace("{path}", "x/y.jpg");
        for method in methods.as_object().unwrap().keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let res = client
                .request(method.clone(), format!("{base}{concrete}"))
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 401, "{method} {concrete}");
            operations += 1;
        }
    }
    assert_eq!(operations, 13, "the document's operations");
    env.teardown().await;
}

/// 2,000 sockets held open on the admin port from one address, and one each from eight
/// others, until every place is taken: the console, from an address of its own, is still
/// served at once, long before any timeout could free a place, because one address holds at
/// most its share and a full listener gives a newcomer the place of the oldest connection
/// that has shown no operator's token. Each refusal is counted by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_cannot_hold_the_admin_api() {
    use crate::support::{connect_from, http_from, metric_value};
    use std::net::IpAddr;
    use tokio::io::AsyncWriteExt as _;
    let mut env = TestEnv::new("idle-admin");
    with_admin_api(&mut env);
    env.cfg.http_max_connections = 16;
    env.cfg.http_max_connections_per_address = 8;
    // Neither timeout frees a place while the test runs: only the sharing does.
    env.cfg.http_idle_timeout_ms = 600_000;
    env.cfg.http_header_timeout_ms = 600_000;
    let _url = env.start_edge("e1").await;
    let admin = env.edges[0].admin_addr.unwrap();
    let host = |last: u8| IpAddr::from([127, 0, 0, last]);
    // 2,000 from one address, each with half a request, then nothing.
    let mut held = Vec::new();
    for _ in 0..2_000 {
        let mut s = connect_from(host(1), admin).await.expect("connected");
        let _ = s
            .write_all(b"GET /v1/admin/clients HTTP/1.1\r\nHost: x\r\n")
            .await;
        held.push(s);
    }
    // Eight more addresses, one socket each: with the first address's 8, every place is taken
    // (sharing places out by address alone would not let a ninth address in).
    for last in 3..=10 {
        held.push(connect_from(host(last), admin).await.expect("connected"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The operator, from another address: the console's first request (who am I), then the
    // client list, each on a connection of its own.
    let me = http_from(host(2), admin, "GET", "/v1/admin/me", Some(ADMIN_TOKEN)).await;
    assert_eq!(
        me.map(|(status, _)| status),
        Some(200),
        "the console's first request"
    );
    let list = http_from(
        host(2),
        admin,
        "GET",
        "/v1/admin/clients",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(list.map(|(status, _)| status), Some(200), "the client list");
    let (_, metrics) = crate::support::http_get(env.edges[0].metrics_addr, "/metrics")
        .await
        .unwrap();
    let refused = |reason: &str| {
        metric_value(
            &metrics,
            &format!("vigil_edge_admin_connections_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    // The first address kept 8 places; the other 1,992 were closed as they came.
    assert!(
        refused("per_address") >= 1_992.0,
        "per address: {}",
        refused("per_address")
    );
    // The first request took the oldest place without a token (one of the first address's);
    // the second, the place the first gave back.
    assert!(refused("evicted") >= 1.0, "evicted: {}", refused("evicted"));
    drop(held);
    env.teardown().await;
}

/// A request whose headers trickle in a byte at a time, each well within the idle timeout, is
/// closed at the header deadline; a request sent whole is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_trickle_are_cut_at_the_header_deadline() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut env = TestEnv::new("slow-headers");
    with_admin_api(&mut env);
    env.cfg.http_idle_timeout_ms = 600_000;
    env.cfg.http_header_timeout_ms = 1_000;
    let _url = env.start_edge("e1").await;
    let admin = env.edges[0].admin_addr.unwrap();
    let mut slow = tokio::net::TcpStream::connect(admin).await.unwrap();
    let request = b"GET /v1/admin/clients HTTP/1.1\r\nHost: x\r\nX-Padding: ".to_vec();
    let started = std::time::Instant::now();
    let mut closed = false;
    // A byte every 100 ms for at most 20 s: the deadline must cut it long before.
    for byte in request.iter().copied().chain(std::iter::repeat(b'a')) {
        if started.elapsed() > Duration::from_secs(20) {
            break;
        }
        if slow.write_all(&[byte]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await {
            // Closed (hyper may answer 408 first), or reset.
            Ok(Ok(_)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed, "the trickling request was cut");
    let (status, _) = http(admin, "GET", "/v1/admin/clients", Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 200);
    env.teardown().await;
}

/// A log of `n` operations on clients `c0`..`c99`, hash-chained as the writer chains them.
fn long_log(dir: &std::path::Path, n: u64) {
    use sha2::Digest as _;
    std::fs::create_dir_all(dir.join("evidence")).unwrap();
    let mut prev = "0".repeat(64);
    let mut out = String::with_capacity(n as usize * 400);
    for seq in 1..=n {
        let record = serde_json::json!({
            "kind": "admin", "entry_id": uuid::Uuid::now_v7(), "operator": "alice",
            "operation": "block", "client_id": format!("c{}", seq % 100), "source": "e1",
            "at_ms": 1_765_000_000_000u64 + seq, "written_at_ms": 1_765_000_000_000u64 + seq,
        })
        .to_string();
        let hash = hex::encode(sha2::Sha256::digest(format!("{seq}\n{prev}\n{record}")));
        out += &format!(r#"{{"seq":{seq},"prev":"{prev}","hash":"{hash}","record":{record}}}"#);
        out.push('\n');
        prev = hash;
    }
    std::fs::write(dir.join("audit.log"), out).unwrap();
}

/// 50 operators open the audit view of a 100,000-entry log at once, through an edge that
/// reads it from the audit writer's API: the log is checked once and indexed, each view then
/// reads its client's entries, and the process stays within a stated memory; an entry
/// appended later is all the next view checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_audit_views_of_a_100k_entry_log() {
    const ENTRIES: u64 = 100_000;
    let mut env = TestEnv::new("auditviews");
    with_admin_api(&mut env);
    crate::support::with_audit_api(&mut env);
    env.cfg.evidence_dir = env.clients_dir.with_extension("evidence");
    long_log(&env.cfg.evidence_dir, ENTRIES);
    // The edge reads the trail through the writer's API, and the writer checks its own log.
    let writer = vigil::audit::start(
        env.cfg.clone(),
        prometheus::Registry::new(),
        env.shutdown.clone(),
    )
    .await
    .unwrap();
    env.start_edge("e1").await;
    let admin = env.edges[0].admin_addr.unwrap();
    let rss_before = crate::support::rss_kib(std::process::id());
    let started = std::time::Instant::now();
    let views: Vec<_> = (0..50)
        .map(|i| {
            tokio::spawn(async move {
                let path = format!("/v1/admin/audit/clients/c{}", i % 100);
                let t = std::time::Instant::now();
                let (status, body) = http(admin, "GET", &path, Some(ADMIN_TOKEN), None).await;
                (status, body, t.elapsed())
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for v in views {
        let (status, body, took) = v.await.unwrap();
        assert_eq!(status, 200, "{body}");
        let view: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            view["verification"]
                .as_str()
                .unwrap()
                .contains(&format!("{ENTRIES} entries")),
            "{view}"
        );
        assert_eq!(view["entries"].as_array().unwrap().len(), 1000);
        slowest = slowest.max(took);
    }
    let all = started.elapsed();
    let rss_after = crate::support::rss_kib(std::process::id());
    // One more entry: the next view checks it alone.
    let mut log = std::fs::read_to_string(env.cfg.evidence_dir.join("audit.log")).unwrap();
    let tail: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    let prev = tail["hash"].as_str().unwrap().to_owned();
    let record = r#"{"kind":"admin","entry_id":"0192f0c4-0000-7000-8000-000000000001","operator":"bob","operation":"kick","client_id":"c7","source":"e1","at_ms":1,"written_at_ms":1}"#;
    let seq = ENTRIES + 1;
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(format!(
        "{seq}\n{prev}\n{record}"
    )));
    log += &format!(r#"{{"seq":{seq},"prev":"{prev}","hash":"{hash}","record":{record}}}"#);
    log.push('\n');
    std::fs::write(env.cfg.evidence_dir.join("audit.log"), log).unwrap();
    let t = std::time::Instant::now();
    let (status, body) = http(
        admin,
        "GET",
        "/v1/admin/audit/clients/c7",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    let next = t.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("{seq} entries")), "{body}");
    assert!(body.contains(r#""operator":"bob""#), "{body}");
    // Entry 7 (one of c7's) rewritten in place at the same length: the log did not grow, so
    // nothing new is checked, but the view reads c7's entries back and sees it.
    let log = std::fs::read_to_string(env.cfg.evidence_dir.join("audit.log")).unwrap();
    let mut lines: Vec<String> = log.lines().map(str::to_owned).collect();
    let forged = lines[6].replacen(r#""operator":"alice""#, r#""operator":"mallo""#, 1);
    assert_ne!(forged, lines[6]);
    lines[6] = forged;
    std::fs::write(
        env.cfg.evidence_dir.join("audit.log"),
        lines.join("\n") + "\n",
    )
    .unwrap();
    let (status, body) = http(
        admin,
        "GET",
        "/v1/admin/audit/clients/c7",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    let verification = view["verification"].as_str().unwrap();
    assert!(
        verification.starts_with("BROKEN at entry 7:") && verification.contains("changed after"),
        "{verification}"
    );
    assert!(!body.contains("mallo"), "the rewritten entry is not shown");
    println!(
        "50 parallel audit views of a {ENTRIES}-entry log: all answered in {:.2} s (slowest \
         view {:.2} s); the test process grew by {} MiB; a view after one more entry took {:.0} ms",
        all.as_secs_f64(),
        slowest.as_secs_f64(),
        rss_after.saturating_sub(rss_before) / 1024,
        next.as_secs_f64() * 1000.0
    );
    let dir = env.cfg.evidence_dir.clone();
    env.shutdown.cancel();
    writer.join().await.unwrap();
    env.teardown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The console's audit view reaches the trail only through the audit writer's read API: over
/// HTTPS (a certificate from the test's CA, which the edge trusts), with the shared token. The
/// writer refuses a request without the token, or with another, and a path outside its
/// evidence; an edge with the wrong token, or with no API at all, shows no trail and says why,
/// counting each failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_reads_the_trail_through_the_audit_writers_api_only() {
    let mut env = TestEnv::new("auditapi");
    with_admin_api(&mut env);
    crate::support::with_audit_api(&mut env);
    let tls = env.clients_dir.with_extension("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let (ca, cert, key) = crate::tls::ca_and_server();
    std::fs::write(tls.join("ca.pem"), ca).unwrap();
    std::fs::write(tls.join("cert.pem"), cert).unwrap();
    std::fs::write(tls.join("key.pem"), key).unwrap();
    env.cfg.audit_api.tls_cert = Some(tls.join("cert.pem"));
    env.cfg.audit_api.tls_key = Some(tls.join("key.pem"));
    env.cfg.audit_api.ca_file = Some(tls.join("ca.pem"));
    let base = env
        .cfg
        .audit_api
        .url
        .as_ref()
        .unwrap()
        .replace("http://", "https://");
    env.cfg.audit_api.url = Some(base.clone());
    env.cfg.evidence_dir = env.clients_dir.with_extension("evidence");
    let registry = prometheus::Registry::new();
    let writer = vigil::audit::start(env.cfg.clone(), registry.clone(), env.shutdown.clone())
        .await
        .unwrap();
    assert_eq!(
        writer.api_addr.map(|a| a.port()),
        base.rsplit(':').next().and_then(|p| p.parse().ok())
    );
    let url = env.start_edge("e1").await;
    env.add_client("c1");
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    let admin = env.edges[0].admin_addr.unwrap();
    let (status, body) = http(
        admin,
        "POST",
        "/v1/admin/clients/c1/action",
        Some(ADMIN_TOKEN),
        Some(r#"{"action":"lock_screen"}"#),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let _ = next(&mut conn).await;
    // The view, through the writer's API over HTTPS.
    let view = eventually(
        "the action in the console's view",
        Duration::from_secs(15),
        || async move {
            let (status, body) = http(
                admin,
                "GET",
                "/v1/admin/audit/clients/c1",
                Some(ADMIN_TOKEN),
                None,
            )
            .await;
            let view: serde_json::Value = serde_json::from_str(&body).ok()?;
            (status == 200
                && view["entries"]
                    .as_array()?
                    .iter()
                    .any(|e| e["kind"] == "action" && e["origin"] == "admin"))
            .then_some(view)
        },
    )
    .await;
    assert_eq!(view["client"], "c1", "{view}");
    assert!(
        view["verification"].as_str().unwrap().contains("entries"),
        "{view}"
    );
    // Straight to the writer: only the token opens it, and only evidence frames are served.
    let client = vigil::telemetry::http::client(
        Some(&tls.join("ca.pem")),
        Duration::from_secs(10),
        "vigil-tests",
    )
    .unwrap();
    let get = |path: &str, token: Option<&str>| {
        let mut request = client.get(format!("{base}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let token = crate::support::AUDIT_API_TOKEN;
    assert_eq!(get("/v1/audit/clients/c1", Some(token)).await.0, 200);
    assert_eq!(get("/v1/audit/clients/c1", None).await.0, 401);
    assert_eq!(get("/v1/audit/clients/c1", Some(ADMIN_TOKEN)).await.0, 401);
    let wrong = format!("{}x", &token[..token.len() - 1]);
    assert_eq!(get("/v1/audit/clients/c1", Some(&wrong)).await.0, 401);
    assert_eq!(
        metric(
            &registry,
            "vigil_audit_api_refused_total",
            Some(("reason", "token"))
        ),
        3.0
    );
    for path in [
        "/v1/audit/evidence/../audit.log",
        "/v1/audit/evidence/%2e%2e/audit.log",
        "/v1/audit/evidence/2026-01-01/c1/x/..%2f..%2f..%2faudit.log",
        "/v1/audit/evidence/2026-01-01/c1/00000000-0000-7000-8000-000000000000/frame-1.jpg",
    ] {
        let (status, body) = get(path, Some(token)).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(!body.contains("\"seq\""), "{path}: {body}");
    }
    // Plain HTTP to an HTTPS listener gets nothing.
    let plain =
        vigil::telemetry::http::client(None, Duration::from_secs(5), "vigil-tests").unwrap();
    let answered = plain
        .get(format!(
            "{}/v1/audit/clients/c1",
            base.replace("https://", "http://")
        ))
        .bearer_auth(token)
        .send()
        .await;
    assert!(
        answered.is_err() || !answered.unwrap().status().is_success(),
        "HTTPS only"
    );
    // Edge `n`'s answer to an audit read, and how many of its reads failed for `reason`.
    async fn read_on(env: &TestEnv, n: usize, path: &str) -> (u16, String) {
        http(
            env.edges[n].admin_addr.unwrap(),
            "GET",
            path,
            Some(ADMIN_TOKEN),
            None,
        )
        .await
    }
    fn failed(env: &TestEnv, n: usize, reason: &str) -> f64 {
        let name = "vigil_edge_audit_api_failed_total";
        metric(&env.edge_registries[n], name, Some(("reason", reason)))
    }
    let trail = "/v1/admin/audit/clients/c1";
    // An edge with another token shows no trail, and says the writer refused it.
    env.cfg.audit_api.token = Some("another-token-that-is-long-enough-0123456789".into());
    env.start_edge("e2").await;
    let (status, body) = read_on(&env, 1, trail).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("VIGIL_AUDIT_API_TOKEN"), "{body}");
    assert_eq!(failed(&env, 1, "refused"), 1.0);
    // An edge with no API: 503, and nothing read from any folder.
    env.cfg.audit_api.url = None;
    env.start_edge("e3").await;
    for path in [
        trail,
        "/v1/admin/audit/evidence/2026-01-01/c1/00000000-0000-7000-8000-000000000000/frame-1.jpg",
    ] {
        let (status, body) = read_on(&env, 2, path).await;
        assert_eq!(status, 503, "{path}: {body}");
        assert!(body.contains("VIGIL_AUDIT_API_URL"), "{body}");
    }
    assert_eq!(failed(&env, 2, "unset"), 2.0);
    // An edge that publishes a key for pinning while the writer checks under none (or
    // another) shows no trail as if it were checked under it.
    env.cfg.audit_api.url = Some(base.clone());
    env.cfg.audit_api.token = Some(crate::support::AUDIT_API_TOKEN.into());
    vigil::audit::signing::generate(&tls.join("other.key")).unwrap();
    env.cfg.audit_public_key = Some(tls.join("other.key.pub"));
    env.start_edge("e4").await;
    let (status, body) = read_on(&env, 3, trail).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("VIGIL_AUDIT_PUBLIC_KEY"), "{body}");
    assert_eq!(failed(&env, 3, "key"), 1.0);
    let dir = env.cfg.evidence_dir.clone();
    env.shutdown.cancel();
    writer.join().await.unwrap();
    env.teardown().await;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&tls);
}

/// With the broker gone, a block cannot be audited first, so it is refused and the client is
/// left as it was; once the broker is back, the same block is audited and made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_with_the_broker_down_is_refused_and_changes_nothing() {
    use crate::support::{Proxy, broker_host};
    let mut env = TestEnv::new("blockdown");
    with_admin_api(&mut env);
    let proxy = Proxy::start(&broker_host()).await;
    env.cfg.amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    env.start_edge("e1").await;
    env.add_client("c1");
    let admin = env.edges[0].admin_addr.unwrap();
    let status_of = async || {
        let (status, body) = http(
            admin,
            "GET",
            "/v1/admin/clients/c1",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["status"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(status_of().await, "active");
    proxy.cut();
    let (status, body) = http(
        admin,
        "POST",
        "/v1/admin/clients/c1/block",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        status_of().await,
        "active",
        "nothing changed without its entry"
    );
    proxy.resume().await;
    eventually(
        "the block, once the broker is back",
        Duration::from_secs(30),
        || async {
            let (status, _) = http(
                admin,
                "POST",
                "/v1/admin/clients/c1/block",
                Some(ADMIN_TOKEN),
                None,
            )
            .await;
            (status == 200).then_some(())
        },
    )
    .await;
    assert_eq!(status_of().await, "blocked");
    env.teardown().await;
}

/// A request whose body stops coming (its headers whole) is closed at the idle timeout, and
/// the listener serves the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_coming_is_cut_at_the_idle_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut env = TestEnv::new("idle-body");
    with_admin_api(&mut env);
    env.cfg.http_idle_timeout_ms = 1_000;
    env.cfg.http_header_timeout_ms = 600_000;
    let _url = env.start_edge("e1").await;
    let admin = env.edges[0].admin_addr.unwrap();
    let mut stalled = tokio::net::TcpStream::connect(admin).await.unwrap();
    stalled
        .write_all(
            format!(
                "POST /v1/admin/clients HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"id\":"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = Vec::new();
    // A bound ten times the idle timeout: without it, nothing would end the request.
    let ended = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut buf)).await;
    assert!(ended.is_ok(), "the stalled request was cut");
    let (status, _) = http(admin, "GET", "/v1/admin/clients", Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 200);
    env.teardown().await;
}

/// `/metrics` keeps the same bounds: sockets held from one address past its share are closed
/// at accept and counted, and with every place taken a scrape from another address is still
/// answered, in the oldest held socket's place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_keeps_the_same_bounds() {
    use crate::support::{connect_from, http_from, metric_value};
    use std::net::IpAddr;
    let mut env = TestEnv::new("metrics-cap");
    env.cfg.http_max_connections = 4;
    env.cfg.http_max_connections_per_address = 2;
    env.cfg.http_idle_timeout_ms = 600_000;
    env.cfg.http_header_timeout_ms = 600_000;
    env.start_edge("e1").await;
    let metrics = env.edges[0].metrics_addr;
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(
            connect_from(IpAddr::from([127, 0, 0, 1]), metrics)
                .await
                .unwrap(),
        );
    }
    // Two more from another address: with the first address's 2, every place is taken.
    for _ in 0..2 {
        held.push(
            connect_from(IpAddr::from([127, 0, 0, 3]), metrics)
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, text) = http_from(
        IpAddr::from([127, 0, 0, 2]),
        metrics,
        "GET",
        "/metrics",
        None,
    )
    .await
    .expect("a scrape from another address is answered");
    assert_eq!(status, 200);
    let refused = metric_value(
        &text,
        r#"vigil_metrics_connections_refused_total{reason="per_address"}"#,
    );
    assert!(refused >= 8.0, "{refused}");
    // The scrape took the oldest place (every one was taken).
    let evicted = metric_value(
        &text,
        r#"vigil_metrics_connections_refused_total{reason="evicted"}"#,
    );
    assert!(evicted >= 1.0, "{evicted}");
    drop(held);
    env.teardown().await;
}
