//! Faults: the broker going away under a live edge.

use std::time::{Duration, Instant};

use vigil::edge::client::{Connection, Incoming};
use vigil::inference::synthetic_jpeg;
use vigil::wire::DropReason;
use vigil::wire::client::{Encoding, ServerMsg};

use crate::support::{Proxy, TOKEN, TestEnv, broker_host, metric};

/// Send frame `seq` and return what the edge answered for it (a result or a `dropped`); the
/// session must stay up to answer.
async fn answer(conn: &mut Connection, seq: u64, jpeg: &[u8]) -> ServerMsg {
    conn.send_frame(seq, 0, jpeg).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), conn.recv()).await {
            Ok(Some(Ok(Incoming::Msg(
                m @ (ServerMsg::Result { .. } | ServerMsg::Dropped { .. }),
            )))) => return m,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no answer to frame {seq}; the session did not survive: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_loses_the_broker_keeps_its_sessions_and_recovers() {
    let mut env = TestEnv::new("brokerloss");
    // The edge reaches the broker through a proxy the test can cut; the worker does not.
    env.start_worker("w1").await;
    let proxy = Proxy::start(&broker_host()).await;
    env.cfg.amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let url = env.start_edge("e1").await;
    env.add_client("c1");
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    let jpeg = synthetic_jpeg(64, 48, 1, 0);
    let mut seq = 0;
    let mut send = async |conn: &mut Connection| -> ServerMsg {
        seq += 1;
        answer(conn, seq, &jpeg).await
    };
    assert!(matches!(send(&mut conn).await, ServerMsg::Result { .. }));

    // The broker goes away: the session stays, frames are answered broker_unavailable.
    proxy.cut();
    let mut unavailable = 0;
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(2) {
        match send(&mut conn).await {
            ServerMsg::Dropped {
                reason: DropReason::BrokerUnavailable,
                ..
            } => unavailable += 1,
            ServerMsg::Dropped {
                reason: DropReason::Expired,
                ..
            } => {}
            other => panic!("during the outage: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(unavailable > 0, "no frame was answered broker_unavailable");

    // The broker is back: the pipeline serves again within 10 s.
    proxy.resume().await;
    let back = Instant::now();
    loop {
        if matches!(send(&mut conn).await, ServerMsg::Result { .. }) {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "not serving 10 s after the broker's return"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovery = back.elapsed();
    println!(
        "broker outage: {unavailable} frames answered broker_unavailable; serving again {recovery:?} after the broker's return"
    );
    assert!(
        metric(
            &env.edge_registries[0],
            "vigil_broker_reconnects_total",
            None
        ) >= 1.0
    );
    conn.close().await;
    proxy.cut();
    env.cfg.amqp_url = crate::support::amqp_url();
    env.teardown().await;
}

const DELAY_WORKER: &[(&str, &str)] = &[
    ("VIGIL_ANALYZER", "delay"),
    ("VIGIL_DELAY_MS", "50"),
    ("VIGIL_WORKER_ANALYSIS_THREADS", "2"),
    ("VIGIL_WORKER_PREFETCH", "4"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_has_its_frames_redelivered_and_nobody_sees_a_duplicate() {
    use crate::support::{
        await_consumers, closed_loop, free_port, http_get, sigterm, spawn_worker_process,
    };
    let mut env = TestEnv::new("workerkill");
    env.cfg.edge.max_inflight = 4;
    let url = env.start_edge("e1").await;
    for i in 0..4 {
        env.add_client(&format!("k{i}"));
    }
    let mut doomed = spawn_worker_process(&env, "doomed", DELAY_WORKER);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut with_metrics = DELAY_WORKER.to_vec();
    with_metrics.push(("VIGIL_METRICS_LISTEN", listen.as_str()));
    let survivor = spawn_worker_process(&env, "survivor", &with_metrics);
    await_consumers(&env, 2).await;

    let load = tokio::spawn({
        let url = url.clone();
        async move { closed_loop(&url, "k", 4, 4, Duration::from_secs(4)).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    doomed.kill().unwrap(); // SIGKILL, holding up to 4 unacked frames
    crate::support::exit_status(&mut doomed);
    let report = load.await.unwrap();

    let (_, text) = http_get(listen.parse().unwrap(), "/metrics").await.unwrap();
    let redelivered: f64 = text
        .lines()
        .find(|l| l.starts_with("vigil_worker_frames_redelivered_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    let duplicates_at_edge = metric(
        &env.edge_registries[0],
        "vigil_edge_results_duplicate_total",
        None,
    );
    println!(
        "worker SIGKILL: {} frames, {} results, {redelivered} redelivered to the survivor, \
         {duplicates_at_edge} duplicate results discarded by the edge, {} duplicates seen by clients",
        report.sent,
        report.results,
        report.duplicates.len()
    );
    assert!(report.missing.is_empty(), "lost: {:?}", report.missing);
    assert!(
        report.duplicates.is_empty(),
        "a client saw a duplicate: {:?}",
        report.duplicates
    );
    assert!(report.dropped.is_empty(), "dropped: {:?}", report.dropped);
    assert!(
        redelivered >= 1.0,
        "the killed worker's frames were not redelivered"
    );
    sigterm(&survivor);
    let mut survivor = survivor;
    crate::support::exit_status(&mut survivor);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_limited_and_others_are_served() {
    let mut env = TestEnv::new("flood");
    env.cfg.edge.max_fps = 20;
    env.cfg.edge.flood_factor = 4;
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    env.add_client("flood");
    env.add_client("calm");
    let jpeg = synthetic_jpeg(64, 48, 1, 0);
    let flooder = tokio::spawn({
        let (url, jpeg) = (url.clone(), jpeg.clone());
        async move {
            let (conn, _) = Connection::connect(&url, "flood", TOKEN, Encoding::MsgPack)
                .await
                .unwrap();
            let (mut tx, mut rx) = conn.split();
            let sender = tokio::spawn(async move {
                for seq in 1..=400 {
                    if tx.send_frame(seq, 0, &jpeg).await.is_err() {
                        break;
                    }
                }
            });
            let (mut limited, mut closed) = (0, None);
            while let Some(Ok(m)) = rx.recv().await {
                match m {
                    Incoming::Msg(ServerMsg::Dropped {
                        reason: DropReason::RateLimited,
                        ..
                    }) => limited += 1,
                    Incoming::Closed { code, .. } => {
                        closed = Some(code);
                        break;
                    }
                    _ => {}
                }
            }
            let _ = sender.await;
            (limited, closed)
        }
    });
    // Meanwhile a well-behaved client at 10 fps gets every frame analysed.
    let (mut calm, _) = Connection::connect(&url, "calm", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    for seq in 1..=30 {
        calm.send_frame(seq, 0, &jpeg).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), calm.recv()).await {
            Ok(Some(Ok(Incoming::Msg(ServerMsg::Result { seq: s, .. })))) => assert_eq!(s, seq),
            other => panic!("the calm client was not served: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (limited, closed) = flooder.await.unwrap();
    assert!(limited > 0, "the flood was not rate limited");
    assert_eq!(closed, Some(4429), "the flooder is closed as too fast");
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_stay_within_the_memory_budget() {
    use crate::support::{await_listening, rss_kib, spawn_edge_process};
    /// The budget: 64 KiB per idle session.
    const BUDGET_KIB_PER_CONNECTION: u64 = 64;
    let env = TestEnv::new("idle");
    for i in 0..1000 {
        env.add_client(&format!("idle{i}"));
    }
    let (mut edge, url) =
        spawn_edge_process(&env, "idle-edge", &[("VIGIL_EDGE_MAX_SESSIONS", "2000")]);
    await_listening(&url).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(edge.id());
    let mut conns = Vec::new();
    for i in 0..1000 {
        let (conn, _) = Connection::connect(&url, &format!("idle{i}"), TOKEN, Encoding::Json)
            .await
            .unwrap();
        conns.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(edge.id());
    let per = (after.saturating_sub(before)) / 1000;
    println!("1000 idle sessions: edge RSS {before} KiB -> {after} KiB ({per} KiB per session)");
    assert!(
        per <= BUDGET_KIB_PER_CONNECTION,
        "{per} KiB per idle session is over the budget"
    );
    drop(conns);
    crate::support::sigterm(&edge);
    crate::support::exit_status(&mut edge);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twice_the_capacity_for_a_minute_keeps_latency_bounded_and_memory_flat() {
    use crate::support::{
        await_consumers, await_listening, rss_kib, sigterm, spawn_edge_process,
        spawn_worker_process,
    };
    let env = TestEnv::new("overload");
    for i in 0..10 {
        env.add_client(&format!("o{i}"));
    }
    // Capacity: one worker, one thread, 20 ms a frame = 50 frames/s. Offered: 10 x 10 fps.
    let mut worker = spawn_worker_process(
        &env,
        "w1",
        &[
            ("VIGIL_ANALYZER", "delay"),
            ("VIGIL_DELAY_MS", "20"),
            ("VIGIL_WORKER_ANALYSIS_THREADS", "1"),
            ("VIGIL_WORKER_PREFETCH", "2"),
        ],
    );
    let (mut edge, url) = spawn_edge_process(&env, "e1", &[]);
    await_listening(&url).await;
    await_consumers(&env, 1).await;
    let warm = vigil::tools::loadgen::run(load(&url, Duration::from_secs(5)), |_, _| {}).await;
    let (edge_before, worker_before) = (rss_kib(edge.id()), rss_kib(worker.id()));
    let report = vigil::tools::loadgen::run(load(&url, Duration::from_secs(60)), |_, _| {}).await;
    let (edge_after, worker_after) = (rss_kib(edge.id()), rss_kib(worker.id()));
    println!("overload warm-up: {}", warm.render());
    println!("overload (2x capacity, 60 s): {}", report.render());
    println!(
        "RSS KiB: edge {edge_before} -> {edge_after}, worker {worker_before} -> {worker_after}"
    );
    let deadline_ms = env.cfg.edge.frame_deadline_ms as f64;
    assert!(
        report.p99_ms < deadline_ms,
        "p99 {} ms is past the {deadline_ms} ms deadline",
        report.p99_ms
    );
    assert!(
        report.results > 2000,
        "the worker was not kept busy: {}",
        report.results
    );
    assert!(report.dropped > 0, "twice the capacity should drop frames");
    assert!(
        report
            .dropped_by_reason
            .keys()
            .all(|r| ["superseded", "expired"].contains(&r.as_str())),
        "{:?}",
        report.dropped_by_reason
    );
    assert_eq!(report.errors, 0, "{:?}", report.errors_by_kind);
    // Flat: growth under 32 MiB each over a minute of overload.
    assert!(
        edge_after < edge_before + 32 * 1024,
        "edge RSS grew {edge_before} -> {edge_after} KiB"
    );
    assert!(
        worker_after < worker_before + 32 * 1024,
        "worker RSS grew {worker_before} -> {worker_after} KiB"
    );
    sigterm(&edge);
    sigterm(&worker);
    crate::support::exit_status(&mut edge);
    crate::support::exit_status(&mut worker);
    env.teardown().await;
}

fn load(url: &str, duration: Duration) -> vigil::tools::loadgen::LoadOptions {
    vigil::tools::loadgen::LoadOptions {
        url: url.to_owned(),
        clients: 10,
        fps: 10.0,
        duration,
        client_prefix: "o".into(),
        token: TOKEN.into(),
        frames: vec![synthetic_jpeg(160, 120, 3, 0)],
        encoding: Encoding::MsgPack,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_from_another_amqp_client_is_dead_lettered_and_nothing_crash_loops() {
    let mut env = TestEnv::new("poison");
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    env.add_client("c1");
    // Debian's amqp-tools, a C client that knows nothing of Vigil's format (.ci/run installs it).
    let poison: [&[u8]; 4] = [
        b"hello world",
        b"{\"type\":\"frame\"}",
        b"\x92\x01\x02",
        &[0xFF; 64],
    ];
    for body in poison {
        let mut child = std::process::Command::new("amqp-publish")
            .args([
                "--url",
                &env.cfg.amqp_url,
                "-e",
                &env.name("frames"),
                "-C",
                "application/msgpack",
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("amqp-publish (Debian package amqp-tools) is installed");
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(body).unwrap();
        assert!(crate::support::exit_status(&mut child).success());
    }
    let broker = env.broker().await;
    let dead = env.name("dead.letters");
    crate::support::eventually(
        "poison in the dead letters",
        Duration::from_secs(10),
        || {
            let (broker, dead) = (&broker, &dead);
            async move { (broker.queue_len(dead).await.ok()? >= 4).then_some(()) }
        },
    )
    .await;
    // It set no `user_id`, so the worker cannot tell who published it: dropped before any
    // decoding, and counted.
    let worker = &env.worker_registries[0];
    assert_eq!(
        metric(
            worker,
            "vigil_worker_dead_lettered_total",
            Some(("reason", "untrusted"))
        ),
        4.0
    );
    assert_eq!(
        metric(
            worker,
            "vigil_broker_untrusted_messages_total",
            Some(("kind", "frame"))
        ),
        4.0
    );
    // The same worker, never restarted, still serves.
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    conn.send_frame(1, 0, &synthetic_jpeg(64, 48, 1, 0))
        .await
        .unwrap();
    assert!(matches!(
        conn.recv().await,
        Some(Ok(Incoming::Msg(ServerMsg::Result { seq: 1, .. })))
    ));
    broker.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_is_survived_and_confirmed_actions_are_kept() {
    use crate::support::PrivateBroker;
    let rabbit = PrivateBroker::start().await;
    let mut env = TestEnv::new("restart");
    env.cfg.amqp_url = rabbit.url();
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;

    // Actions confirmed to the audit queue before the restart (no writer is running).
    let broker = env.broker().await;
    let publisher = broker.publisher().await.unwrap();
    let mut confirmed = Vec::new();
    for i in 0..5 {
        let env_ = vigil::wire::Envelope {
            schema: vigil::wire::SCHEMA,
            id: uuid::Uuid::now_v7(),
            source: "e1".into(),
            seq: i,
            client_id: "c0".into(),
            produced_at_ms: vigil::wire::now_ms(),
            deadline_ms: 0,
            traceparent: String::new(),
            payload: vigil::wire::Payload::Action(vigil::wire::ActionEvent {
                action_id: {
                    let id = uuid::Uuid::now_v7();
                    confirmed.push(id);
                    id
                },
                evidence_id: uuid::Uuid::now_v7(),
                action: vigil::policy::Action::LockScreen,
                reason: "wrong_person".into(),
                origin: "policy".into(),
                session: 1,
                decided_at_ms: vigil::wire::now_ms(),
                rule: "test".into(),
                evidence: vec![],
                operator: None,
                challenge: None,
            }),
        };
        publisher
            .publish(&env.name("actions"), "", &env_)
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
    }
    broker.close().await;

    // Three clients stream through the restart.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for i in 0..3 {
        let id = format!("c{i}");
        env.add_client(&id);
        let (url, stop) = (url.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let (mut conn, _) = Connection::connect(&url, &id, TOKEN, Encoding::MsgPack)
                .await
                .unwrap();
            let jpeg = synthetic_jpeg(64, 48, 1, 0);
            let mut results_at = Vec::new();
            let mut unavailable = 0;
            let mut seq = 0;
            while !stop.is_cancelled() {
                seq += 1;
                conn.send_frame(seq, 0, &jpeg)
                    .await
                    .expect("the session survives");
                match tokio::time::timeout(Duration::from_secs(10), conn.recv()).await {
                    Ok(Some(Ok(Incoming::Msg(ServerMsg::Result { .. })))) => {
                        results_at.push(Instant::now())
                    }
                    Ok(Some(Ok(Incoming::Msg(ServerMsg::Dropped {
                        reason: DropReason::BrokerUnavailable,
                        ..
                    })))) => unavailable += 1,
                    Ok(Some(Ok(Incoming::Msg(ServerMsg::Dropped { .. })))) => {}
                    other => panic!("client {id}: {other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (results_at, unavailable)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbit.stop();
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbit.boot().await;
    let back = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.cancel();

    let mut recoveries = Vec::new();
    for c in clients {
        let (results_at, unavailable) = c.await.unwrap();
        assert!(
            unavailable > 0,
            "frames during the outage are answered broker_unavailable"
        );
        let first_after = results_at
            .iter()
            .find(|t| **t > back)
            .expect("served again after the restart");
        let recovery = first_after.duration_since(back);
        assert!(
            recovery < Duration::from_secs(10),
            "served again only {recovery:?} after the broker's return"
        );
        assert!(
            results_at.iter().any(|t| *t < stopped),
            "served before the restart"
        );
        recoveries.push(recovery);
    }
    // The audit queue kept them (with the sessions' starts and ends): an audit writer started
    // now writes all five.
    env.cfg.evidence_dir = env.clients_dir.join("evidence");
    let writer = vigil::audit::start(
        env.cfg.clone(),
        prometheus::Registry::new(),
        env.shutdown.clone(),
    )
    .await
    .unwrap();
    let dir = env.cfg.evidence_dir.clone();
    let written = crate::support::eventually(
        "the confirmed actions in the trail",
        Duration::from_secs(20),
        || {
            let (dir, confirmed) = (dir.clone(), confirmed.clone());
            async move {
                let records = vigil::audit::records(&dir).ok()?;
                confirmed
                    .iter()
                    .all(|id| records.iter().any(|r| r.action_id == *id))
                    .then_some(records.len())
            }
        },
    )
    .await;
    let kept = confirmed.len();
    assert!(written >= kept);
    println!(
        "broker restart: the outage lasted {:?}; clients served again {recoveries:?} after the broker's return; {kept} confirmed actions kept",
        back.duration_since(stopped)
    );
    env.shutdown.cancel();
    writer.join().await.unwrap();
    let clients_dir = env.clients_dir.clone();
    env.teardown().await;
    let _ = std::fs::remove_dir_all(clients_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_alarm_answers_frames_at_once_and_traffic_resumes_when_it_clears() {
    use crate::support::{PrivateBroker, http_get};
    let rabbit = PrivateBroker::start().await;
    let mut env = TestEnv::new("alarm");
    env.cfg.amqp_url = rabbit.url();
    env.cfg.edge.admission_poll_ms = 100;
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    env.add_client("c1");
    let metrics = env.edges[0].metrics_addr;
    let (mut conn, _) = Connection::connect(&url, "c1", crate::support::TOKEN, Encoding::Json)
        .await
        .unwrap();
    let jpeg = vigil::inference::synthetic_jpeg(64, 48, 5, 0);
    let mut seq = 0;
    let mut one = async |conn: &mut Connection| -> ServerMsg {
        seq += 1;
        answer(conn, seq, &jpeg).await
    };
    assert!(matches!(one(&mut conn).await, ServerMsg::Result { .. }));

    // A memory alarm: RabbitMQ blocks every publishing connection.
    assert!(rabbit.ctl(&["set_vm_memory_high_watermark", "0.0000001"]));
    let started = std::time::Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "frames were never answered broker_unavailable during the alarm"
        );
        if let ServerMsg::Dropped {
            reason: DropReason::BrokerUnavailable,
            ..
        } = one(&mut conn).await
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = http_get(metrics, "/readyz").await.unwrap();
    assert_eq!(status, 503, "readyz during the alarm: {body}");

    // The alarm clears: results flow again, and the edge is ready.
    assert!(rabbit.ctl(&["set_vm_memory_high_watermark", "0.4"]));
    let started = std::time::Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "results never came back after the alarm cleared"
        );
        if let ServerMsg::Result { .. } = one(&mut conn).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = http_get(metrics, "/readyz").await.unwrap();
    assert_eq!(status, 200);
    conn.close().await;
    env.teardown().await;
    rabbit.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_the_broker_is_down_reach_live_sessions_when_it_is_back() {
    use crate::support::PrivateBroker;
    use vigil::directory::{ClientStatus, ClientStore, FolderStore};
    let rabbit = PrivateBroker::start().await;
    let mut env = TestEnv::new("recheck");
    env.cfg.amqp_url = rabbit.url();
    let url = env.start_edge("e1").await;
    env.add_client("c1");
    env.add_client("c2");
    let (mut c1, _) = Connection::connect(&url, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    let (mut c2, _) = Connection::connect(&url, "c2", TOKEN, Encoding::Json)
        .await
        .unwrap();

    // While the broker is down, an operator blocks c1 and pauses c2: the directory changes,
    // and the control events that would carry the changes cannot be published.
    rabbit.stop();
    let store = FolderStore::open(&env.clients_dir).unwrap();
    for (id, status) in [("c1", ClientStatus::Blocked), ("c2", ClientStatus::Paused)] {
        let mut record = store.get(id).unwrap().unwrap();
        record.status = status;
        store.put(&record).unwrap();
    }
    rabbit.boot().await;

    // Once the edge is back on the broker it re-checks its sessions against the directory.
    let until = Instant::now() + Duration::from_secs(60);
    let blocked = loop {
        assert!(Instant::now() < until, "c1 was never closed as blocked");
        match tokio::time::timeout(Duration::from_secs(5), c1.recv()).await {
            Ok(Some(Ok(Incoming::Closed { code, .. }))) => break code,
            Ok(None) | Ok(Some(Err(_))) => panic!("c1 ended without a close code"),
            _ => {}
        }
    };
    assert_eq!(blocked, 4403);
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < until, "c2 was never told it is paused");
        match tokio::time::timeout(Duration::from_secs(5), c2.recv()).await {
            Ok(Some(Ok(Incoming::Msg(ServerMsg::Status { state })))) if state == "paused" => break,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Incoming::Closed { .. }))) => {
                panic!("c2 ended before it was paused")
            }
            _ => {}
        }
    }
    c2.close().await;
    env.teardown().await;
}
