//! Vigil as a cluster: two `vigil-edge` processes sharing a client directory in PostgreSQL,
//! behind HAProxy running `deploy/haproxy/haproxy.cfg`, with the machine's RabbitMQ.
//!
//! Figures (how long a block took to reach the other edge, how long clients of a killed edge
//! took to be answered again) are printed, not asserted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vigil::directory::{ClientRecord, ClientStore, PgLimits, PgStore};
use vigil::edge::client::{Connection, Incoming};
use vigil::wire::client::{Encoding, ErrorCode, ServerMsg};

use crate::support::{
    Haproxy, KillOnDrop, TOKEN, TestDatabase, TestEnv, eventually, free_port, http,
    spawn_edge_process, stream_through,
};

const ADMIN_TOKEN: &str = "cluster-admin-token-0123456789";

/// One edge process of the cluster, with the addresses HAProxy needs.
struct Edge {
    id: String,
    ws: String,
    admin: std::net::SocketAddr,
    metrics_port: u16,
    process: KillOnDrop,
}

fn spawn_edge(env: &TestEnv, db: &TestDatabase, id: &str, lease_ms: &str) -> Edge {
    let (admin_port, metrics_port) = (free_port(), free_port());
    let admin = format!("127.0.0.1:{admin_port}");
    let (child, url) = spawn_edge_process(
        env,
        id,
        &[
            ("VIGIL_DIRECTORY_URL", &db.url),
            ("VIGIL_ADMIN_LISTEN", &admin),
            ("VIGIL_ADMIN_TOKEN", ADMIN_TOKEN),
            ("VIGIL_METRICS_LISTEN", &format!("127.0.0.1:{metrics_port}")),
            ("VIGIL_EDGE_LEASE_MS", lease_ms),
            // HAProxy connects from 127.0.0.1 and names each client in a PROXY v2 header.
            ("VIGIL_EDGE_TRUSTED_PROXIES", "127.0.0.1"),
            ("VIGIL_EDGE_FAILED_HELLOS_PER_MINUTE", "5"),
            // These tests show the per-address limit; a client id's own budget, which would
            // lock `c1` out for every address, is shown in `sessions::wrong_tokens_…`.
            ("VIGIL_EDGE_FAILED_HELLOS_PER_ID", "1000"),
        ],
    );
    Edge {
        id: id.into(),
        ws: crate::support::ws_addr(&url),
        admin: admin.parse().unwrap(),
        metrics_port,
        process: KillOnDrop(child),
    }
}

async fn ready(edge: &Edge) {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", edge.metrics_port).parse().unwrap();
    eventually(
        &format!("{} ready", edge.id),
        Duration::from_secs(30),
        || async move {
            let (status, _) = crate::support::http_get(addr, "/readyz").await.ok()?;
            (status == 200).then_some(())
        },
    )
    .await;
}

/// The test's directory in PostgreSQL, with `clients` added.
fn directory(db: &TestDatabase, clients: &[&str]) -> PgStore {
    let store = PgStore::connect(&db.url, &PgLimits::default()).expect("directory in PostgreSQL");
    for id in clients {
        store
            .add(&ClientRecord::new(id, id, TOKEN).unwrap())
            .unwrap();
    }
    store
}

/// Edges `edge-a` and `edge-b` on the test's directory, ready, behind HAProxy.
async fn two_edges_behind_haproxy(
    env: &TestEnv,
    db: &TestDatabase,
    lease_ms: u64,
) -> (Edge, Edge, Haproxy) {
    let a = spawn_edge(env, db, "edge-a", &lease_ms.to_string());
    let b = spawn_edge(env, db, "edge-b", &lease_ms.to_string());
    ready(&a).await;
    ready(&b).await;
    let lb = Haproxy::start([
        (&a.ws, &a.admin.to_string(), a.metrics_port),
        (&b.ws, &b.admin.to_string(), b.metrics_port),
    ])
    .await;
    (a, b, lb)
}

async fn clients_on(admin: std::net::SocketAddr) -> Vec<serde_json::Value> {
    let (status, body) = http(admin, "GET", "/v1/admin/clients", Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_share_a_postgres_directory_behind_haproxy() {
    let db = TestDatabase::create();
    let mut env = TestEnv::new("cluster");
    env.start_worker("w1").await;
    let store = directory(&db, &["c1", "busy"]);
    let (a, b, lb) = two_edges_behind_haproxy(&env, &db, 15_000).await;

    // A client on edge B, blocked through edge A's admin API.
    let (mut conn, _) = Connection::connect(
        &format!("ws://{}/v1/stream", b.ws),
        "c1",
        TOKEN,
        Encoding::MsgPack,
    )
    .await
    .unwrap();
    let started = Instant::now();
    let (status, body) = http(
        a.admin,
        "POST",
        "/v1/admin/clients/c1/block",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), conn.recv()).await {
            Ok(Some(Ok(Incoming::Closed { code, .. }))) => break code,
            Ok(Some(Ok(Incoming::Msg(ServerMsg::Error { code, .. })))) => {
                assert_eq!(code, ErrorCode::Blocked);
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("expected the block to close the session, got {other:?}"),
        }
    };
    assert_eq!(closed, 4403);
    println!(
        "cluster: a block through edge A closed the session on edge B after {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    // The block is in the shared directory: edge B refuses the client's next hello.
    let refused = Connection::connect(&lb.ws_url, "c1", TOKEN, Encoding::MsgPack).await;
    assert!(
        refused.is_err(),
        "a blocked client is refused through the load balancer"
    );

    // 50 concurrent operations on one client, half through each edge (and so through two
    // connection pools): each lands, and none overwrites another.
    let before = store.get("busy").unwrap().unwrap().revision;
    let ops = (0..50).map(|i| {
        let admin = if i % 2 == 0 { a.admin } else { b.admin };
        let op = if i % 4 < 2 { "pause" } else { "resume" };
        async move {
            http(
                admin,
                "POST",
                &format!("/v1/admin/clients/busy/{op}"),
                Some(ADMIN_TOKEN),
                None,
            )
            .await
        }
    });
    let answers = futures_util::future::join_all(ops).await;
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
    }
    let after = store.get("busy").unwrap().unwrap().revision;
    assert_eq!(
        after - before,
        50,
        "every one of 50 concurrent updates was kept"
    );
    let rows = db.query("SELECT revision FROM vigil_clients WHERE id = 'busy'");
    assert_eq!(rows[0].get::<_, i64>(0) as u64, after);

    // The console through HAProxy's admin port reads the same directory.
    let listed = clients_on(lb.admin_addr).await;
    assert!(
        listed
            .iter()
            .any(|c| c["id"] == "c1" && c["status"] == "blocked")
    );
    drop(lb);
    drop((a, b));
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_an_edge_killed_with_sigkill_continue_on_the_other() {
    let db = TestDatabase::create();
    let mut env = TestEnv::new("edgekill");
    env.start_worker("w1").await;
    let ids: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    let store = directory(&db, &ids.iter().map(String::as_str).collect::<Vec<_>>());
    let lease_ms = 3_000;
    let (mut a, b, lb) = two_edges_behind_haproxy(&env, &db, lease_ms).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::new();
    for id in &ids {
        let answers = Arc::new(AtomicU64::new(0));
        let last = Arc::new(std::sync::Mutex::new(Instant::now()));
        let task = stream_through(
            lb.ws_url.clone(),
            id.clone(),
            answers.clone(),
            last.clone(),
            stop.clone(),
        );
        streams.push((id.clone(), answers, last, task));
    }
    // Every client answered, spread over both edges (HAProxy balances by least connections).
    let on_a: Vec<String> = eventually(
        "every client live, some on each edge",
        Duration::from_secs(30),
        || async {
            let rows = clients_on(b.admin).await;
            let live = |edge: &str| -> Vec<String> {
                rows.iter()
                    .filter(|r| r["connection"] == "active" && r["edge"] == edge)
                    .filter_map(|r| r["id"].as_str().map(str::to_owned))
                    .collect()
            };
            let (on_a, on_b) = (live("edge-a"), live("edge-b"));
            let answered = streams
                .iter()
                .all(|(_, n, _, _)| n.load(Ordering::Relaxed) > 0);
            (answered && on_a.len() + on_b.len() == ids.len() && !on_a.is_empty()).then_some(on_a)
        },
    )
    .await;

    // SIGKILL edge A: no goodbye, no presence written, no lease given up.
    let counts_at_kill: Vec<u64> = streams
        .iter()
        .map(|(_, n, _, _)| n.load(Ordering::Relaxed))
        .collect();
    let killed = Instant::now();
    a.process.0.kill().unwrap();
    let _ = a.process.0.wait();

    // Every client of A is answered again, through HAProxy, by B.
    let resumed = eventually(
        "edge A's clients answered again",
        Duration::from_secs(30),
        || async {
            streams
                .iter()
                .zip(&counts_at_kill)
                .filter(|((id, _, _, _), _)| on_a.contains(id))
                .all(|((_, n, last, _), before)| {
                    n.load(Ordering::Relaxed) > *before + 2 && *last.lock().unwrap() > killed
                })
                .then_some(killed.elapsed())
        },
    )
    .await;
    println!(
        "cluster: {} client(s) of the killed edge were answered again by the other after at \
         most {:.0} ms",
        on_a.len(),
        resumed.as_secs_f64() * 1e3
    );
    // The directory shows them on B.
    let moved = eventually(
        "the directory shows every client on edge B",
        Duration::from_secs(30),
        || async {
            let rows = clients_on(b.admin).await;
            rows.iter()
                .all(|r| r["connection"] == "active" && r["edge"] == "edge-b")
                .then_some(killed.elapsed())
        },
    )
    .await;
    println!(
        "cluster: the directory showed all {} clients on edge B {:.0} ms after the kill",
        ids.len(),
        moved.as_secs_f64() * 1e3
    );
    // Edge A's lease runs out: nothing in the directory still claims to be on it.
    eventually(
        "edge A's lease runs out",
        Duration::from_millis(lease_ms * 3),
        || async {
            let lease = store.lease("edge-a").unwrap()?;
            (lease < vigil::wire::now_ms()).then_some(())
        },
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    for (_, _, _, task) in streams {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    drop(lb);
    drop(b);
    env.teardown().await;
}

/// Behind HAProxy with PROXY protocol v2, each edge limits candidates by their own addresses:
/// one address that keeps failing its hellos is throttled, and a candidate at another address
/// still gets in. A PROXY header from a peer that is not the trusted proxy is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_each_candidate_is_limited_by_its_own_address() {
    let db = TestDatabase::create();
    let env = TestEnv::new("realaddr");
    let _store = directory(&db, &["c1"]);
    let (a, b, lb) = two_edges_behind_haproxy(&env, &db, 15_000).await;

    // 127.0.0.2 guesses tokens until both edges throttle it (5 failures a minute each).
    let mut answers = Vec::new();
    for _ in 0..40 {
        answers.push(
            crate::support::hello_from("127.0.0.2", &lb.ws_url, "c1", "a-guessed-token", b"").await,
        );
        if answers
            .iter()
            .rev()
            .take(4)
            .filter(|a| *a == "error too_fast")
            .count()
            == 4
        {
            break;
        }
    }
    assert!(
        answers.iter().any(|a| a == "error unauthorized"),
        "{answers:?}"
    );
    assert!(
        answers.ends_with(&["error too_fast".to_owned(), "error too_fast".to_owned()]),
        "{answers:?}"
    );
    // Now even its right token is turned away, before any hashing...
    assert_eq!(
        crate::support::hello_from("127.0.0.2", &lb.ws_url, "c1", TOKEN, b"").await,
        "error too_fast"
    );
    // ...while a candidate at another address gets in, on either edge.
    for _ in 0..4 {
        assert_eq!(
            crate::support::hello_from("127.0.0.3", &lb.ws_url, "c1", TOKEN, b"").await,
            "welcome"
        );
    }

    // Straight to an edge from an address that is not the trusted proxy, claiming to be
    // someone else in a PROXY header: refused before any HTTP.
    let forged = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "198.51.100.9:4000".parse::<std::net::SocketAddr>().unwrap(),
            "127.0.0.1:80".parse::<std::net::SocketAddr>().unwrap(),
        ),
    )
    .build()
    .unwrap();
    let direct = format!("ws://{}/v1/stream", a.ws);
    let refused = crate::support::hello_from("127.0.0.4", &direct, "c1", TOKEN, &forged).await;
    assert!(refused.starts_with("no websocket"), "{refused}");
    // The same address without a header is an ordinary client.
    assert_eq!(
        crate::support::hello_from("127.0.0.4", &direct, "c1", TOKEN, b"").await,
        "welcome"
    );
    let metrics_addr: std::net::SocketAddr =
        format!("127.0.0.1:{}", a.metrics_port).parse().unwrap();
    let (_, metrics) = crate::support::http_get(metrics_addr, "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"vigil_edge_sessions_refused_total{reason="proxy_untrusted"} 1"#),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("refused"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Behind an HTTP ingress there is no PROXY header: from the trusted proxy's address, the
    // last X-Forwarded-For address is the client, throttled on its own.
    let mut answers = Vec::new();
    for _ in 0..12 {
        answers.push(
            crate::support::hello_with(
                "127.0.0.1",
                &direct,
                "c1",
                "a-guessed-token",
                b"",
                Some("10.1.1.1, 198.51.100.77"),
            )
            .await,
        );
    }
    assert_eq!(
        answers.last().map(String::as_str),
        Some("error too_fast"),
        "{answers:?}"
    );
    assert_eq!(
        crate::support::hello_with(
            "127.0.0.1",
            &direct,
            "c1",
            TOKEN,
            b"",
            Some("198.51.100.78")
        )
        .await,
        "welcome"
    );
    // From an untrusted peer the header means nothing: 127.0.0.4 is itself, and not throttled.
    assert_eq!(
        crate::support::hello_with(
            "127.0.0.4",
            &direct,
            "c1",
            TOKEN,
            b"",
            Some("198.51.100.77")
        )
        .await,
        "welcome"
    );
    drop((a, b, lb));
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_directory_moves_into_postgres_with_the_cli() {
    use vigil::directory::{ClientStatus, FolderStore};
    let db = TestDatabase::create();
    let folder = std::env::temp_dir().join(format!("vigil-move-{:08x}", rand::random::<u32>()));
    let source = FolderStore::open(&folder).unwrap();
    for id in ["m1", "m2", "m3"] {
        source
            .add(&ClientRecord::new(id, id, TOKEN).unwrap())
            .unwrap();
    }
    let photo_file = source
        .put_reference_photo("m2", b"\xff\xd8 a photo")
        .unwrap();
    source
        .update("m2", &mut |r| {
            r.reference = Some(vigil::directory::Reference {
                embedding_b64: "AAAAAA==".into(),
                photo_file: photo_file.clone(),
                model: "sface:1".into(),
                enrolled_at_ms: 1,
            })
        })
        .unwrap();
    source
        .update("m3", &mut |r| r.status = ClientStatus::Blocked)
        .unwrap();
    // An import is audited first, so the CLI speaks to the broker, in a namespace of its own.
    let env = TestEnv::new("move");
    let vigil = |args: &[&str]| {
        let out = crate::support::output(
            std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
                .args(args)
                .env("VIGIL_DIRECTORY_URL", &db.url)
                .env("VIGIL_NAMESPACE", &env.cfg.namespace)
                .env("VIGIL_AMQP_URL", &env.cfg.amqp_url)
                .env("RUST_LOG", "warn"),
        );
        assert!(
            out.status.success(),
            "vigil {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    vigil(&["directory", "migrate"]);
    let report: serde_json::Value = serde_json::from_str(&vigil(&[
        "directory",
        "import",
        folder.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["added"], 3, "{report}");
    // Again: everything is there already and is kept.
    let report: serde_json::Value = serde_json::from_str(&vigil(&[
        "directory",
        "import",
        folder.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        (report["added"].clone(), report["kept"].clone()),
        (0.into(), 3.into())
    );

    // What PostgreSQL now holds is what the folder held: records, photo, status, token.
    let moved: Vec<vigil::directory::Exported> = vigil(&["directory", "export"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut held = Vec::new();
    vigil::directory::export(&source, &mut held).unwrap();
    let held: Vec<vigil::directory::Exported> = String::from_utf8(held)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(moved, held);
    let store = directory(&db, &[]);
    assert!(
        vigil::directory::authenticate(
            &store,
            "m1",
            &vigil::directory::Credential::Token(TOKEN.into())
        )
        .is_ok()
    );
    assert_eq!(
        vigil::directory::authenticate(
            &store,
            "m3",
            &vigil::directory::Credential::Token(TOKEN.into())
        )
        .unwrap_err(),
        vigil::directory::AuthError::Blocked
    );
    assert_eq!(
        store.reference_photo("m2").unwrap().as_deref(),
        Some(&b"\xff\xd8 a photo"[..])
    );
    let _ = std::fs::remove_dir_all(&folder);
    env.teardown().await;
}

/// The console's page (its clients, their total and their presences) is read on the directory's
/// small pool of its own: with every connection of the main pool held (here its one, by an
/// update in progress), the console still gets its page, and the pages follow each other.
#[test]
fn the_console_page_is_read_beside_a_busy_pool() {
    let db = TestDatabase::create();
    let limits = PgLimits {
        pool: 1,
        connect_timeout: Duration::from_secs(2),
        ..PgLimits::default()
    };
    let store = std::sync::Arc::new(PgStore::connect(&db.url, &limits).unwrap());
    for id in ["p1", "p2", "p3", "p4", "p5"] {
        store
            .add(&ClientRecord::new(id, id, TOKEN).unwrap())
            .unwrap();
    }
    store
        .update("p3", &mut |r| {
            r.status = vigil::directory::ClientStatus::Blocked
        })
        .unwrap();
    // An update that holds the main pool's only connection until the test lets it go (30 s at
    // most).
    let held = std::sync::Arc::new(std::sync::Barrier::new(2));
    let (release, released) = std::sync::mpsc::channel::<()>();
    let holder = {
        let (store, held) = (store.clone(), held.clone());
        std::thread::spawn(move || {
            store
                .update("p1", &mut move |_| {
                    held.wait();
                    let _ = released.recv_timeout(Duration::from_secs(30));
                })
                .unwrap();
        })
    };
    held.wait();
    let first =
        vigil::admin::list_page(&*store, None, 2, None).expect("a page beside the busy pool");
    let ids: Vec<&str> = first.clients.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        (ids, first.total, first.next.as_deref()),
        (vec!["p1", "p2"], 5, Some("p2"))
    );
    let second = vigil::admin::list_page(&*store, Some("p2"), 2, None).unwrap();
    let ids: Vec<&str> = second.clients.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        (ids, second.next.as_deref()),
        (vec!["p3", "p4"], Some("p4"))
    );
    let last = vigil::admin::list_page(&*store, Some("p4"), 2, None).unwrap();
    assert_eq!((last.clients.len(), last.next), (1, None));
    let blocked = vigil::admin::list_page(
        &*store,
        None,
        10,
        Some(vigil::directory::ClientStatus::Blocked),
    )
    .unwrap();
    let ids: Vec<&str> = blocked.clients.iter().map(|c| c.id.as_str()).collect();
    assert_eq!((ids, blocked.total), (vec!["p3"], 1));
    // Meanwhile the main pool is busy: a read there waits and gives up.
    assert!(matches!(
        store.get("p2"),
        Err(vigil::directory::DirectoryError::Busy(_))
    ));
    release.send(()).unwrap();
    holder.join().unwrap();
}

/// Hellos that the directory cannot answer (PostgreSQL unreachable) are refused `system_full`
/// (retried by the SDK) and not held against the address: after ten of them, with a quota of
/// three failed hellos a minute, the client connects as soon as the directory is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_the_directory_cannot_answer_are_not_held_against_the_address() {
    let db = TestDatabase::create();
    drop(directory(&db, &["c1"]));
    let host = db
        .url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    let proxy = crate::support::Proxy::start(&host).await;
    let mut env = TestEnv::new("dirdown");
    env.cfg.directory_url = Some(
        db.url
            .replacen(&host, &format!("127.0.0.1:{}", proxy.port), 1),
    );
    env.cfg.edge.failed_hellos_per_minute = 3;
    // Each refused hello waits this long for a connection.
    env.cfg.directory_timeout_ms = 1_000;
    let url = env.start_edge("e1").await;
    let (conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::Json)
        .await
        .expect("the directory answers");
    drop(conn);
    proxy.cut();
    // The cut takes effect once the proxy's task is gone: the first refusal says so.
    eventually("the directory cut off", Duration::from_secs(20), || async {
        matches!(
            Connection::connect(&url, "c1", TOKEN, Encoding::Json).await,
            Err(vigil::edge::client::ClientError::Refused { code, .. }) if code == "system_full"
        )
        .then_some(())
    })
    .await;
    for _ in 0..10 {
        let refused = Connection::connect(&url, "c1", TOKEN, Encoding::Json).await;
        assert!(
            matches!(&refused, Err(vigil::edge::client::ClientError::Refused { code, .. }) if code == "system_full"),
            "{:?}",
            refused.map(|(_, w)| w)
        );
    }
    assert!(
        crate::support::metric(
            &env.edge_registries[0],
            "vigil_edge_sessions_refused_total",
            Some(("reason", "directory_unavailable"))
        ) >= 10.0
    );
    proxy.resume().await;
    eventually(
        "the client connects once the directory is back",
        Duration::from_secs(30),
        || async {
            Connection::connect(&url, "c1", TOKEN, Encoding::Json)
                .await
                .ok()
                .map(drop)
        },
    )
    .await;
    env.teardown().await;
}
