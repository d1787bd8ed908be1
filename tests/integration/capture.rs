//! Record and replay captured frame queues, through the real pipeline and models.

use std::path::PathBuf;
use std::time::Duration;

use vigil::edge::client::{Connection, Incoming};
use vigil::tools::capture::{
    Capture, CaptureHeader, CaptureRecord, CaptureWriter, FORMAT_VERSION, RecordKind,
};
use vigil::tools::replay::{ReplayOptions, Speed};
use vigil::wire::client::{Encoding, ServerMsg};

use crate::identity::{inference_config, photo};
use crate::support::{TOKEN, TestEnv, await_consumers, sigterm, spawn_worker_process};

fn models_env(match_cosine: &str) -> Vec<(String, String)> {
    let cfg = inference_config();
    let mut env = vec![
        ("VIGIL_ANALYZER".to_string(), "identity".to_string()),
        ("VIGIL_WORKER_ANALYSIS_THREADS".into(), "2".into()),
        (
            "VIGIL_MODELS_DIR".into(),
            cfg.models_dir.display().to_string(),
        ),
        ("VIGIL_MATCH_COSINE".into(), match_cosine.into()),
    ];
    if let Some(ort) = cfg.ort_dylib {
        env.push(("VIGIL_ORT_DYLIB".into(), ort.display().to_string()));
    }
    env
}

fn worker(env: &TestEnv, id: &str, match_cosine: &str) -> std::process::Child {
    let vars = models_env(match_cosine);
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    spawn_worker_process(env, id, &refs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_traffic_replays_identically_and_a_stricter_threshold_is_caught() {
    let mut env = TestEnv::new("replay");
    env.add_client("candidate");
    let store = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    let reference = std::env::temp_dir().join(format!("{}-ref.jpg", env.cfg.namespace));
    std::fs::write(&reference, photo("Male_41_2_4_1.jpg")).unwrap();
    env.cfg.inference = inference_config();
    vigil::tools::cli::enroll(&env.cfg, &store, "candidate", &reference).unwrap();
    // The photo sent over and over is still, and the challenge that asks for goes unanswered:
    // on a slow machine its deadline and its retry's could run out before the recording ends
    // and sign the client out. This test is about recording and replay, not liveness.
    env.cfg.challenge.deadline_ms = 120_000;
    let url = env.start_edge("e1").await;
    let mut w = worker(&env, "models-1", "0.363");
    await_consumers(&env, 1).await;

    // Record 100 frames of live traffic, with results.
    let file = std::env::temp_dir().join(format!("{}.vcap", env.cfg.namespace));
    let recorder = {
        let (cfg, file) = (env.cfg.clone(), file.clone());
        tokio::spawn(async move {
            let opts = vigil::tools::recorder::RecordOptions {
                results: true,
                duration: None,
                max_frames: Some(100),
            };
            vigil::tools::recorder::record(
                &cfg,
                &file,
                &opts,
                tokio_util::sync::CancellationToken::new(),
                &mut |_| {},
            )
            .await
            .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frames = [
        vigil::inference::camera_frame(&photo("Male_41_6_1.jpg"), 640)
            .unwrap()
            .0,
        vigil::inference::camera_frame(&photo("Female_43_6.jpg"), 640)
            .unwrap()
            .0,
    ];
    let (mut conn, _) = Connection::connect(&url, "candidate", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    let mut seq = 0;
    while !recorder.is_finished() && seq < 200 {
        seq += 1;
        // Mostly the candidate, with a stretch of a stranger that makes the policy act.
        let jpeg = &frames[usize::from((30..40).contains(&(seq % 60)))];
        conn.send_frame(seq, 0, jpeg).await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(20), conn.recv()).await {
                Ok(Some(Ok(Incoming::Msg(
                    ServerMsg::Result { .. } | ServerMsg::Dropped { .. },
                )))) => break,
                // A photo sent over and over is still: a suspicion asks for a challenge.
                Ok(Some(Ok(Incoming::Msg(
                    ServerMsg::Action { .. }
                    | ServerMsg::Challenge { .. }
                    | ServerMsg::ChallengeProgress { .. }
                    | ServerMsg::ChallengeResult { .. },
                )))) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let counts = recorder.await.unwrap();
    assert_eq!(counts.frames, 100);
    let capture = Capture::read_file(&file).unwrap();
    let info = capture.info();
    assert_eq!(
        (info.frames, info.results, info.truncated),
        (100, 100, false)
    );
    assert_eq!(info.clients.keys().collect::<Vec<_>>(), ["candidate"]);

    // Replay against the same configuration: exactly 100 results, no differences.
    let opts = ReplayOptions {
        speed: Speed::Max,
        compare: true,
        tolerance: 0.0,
        max_inflight: 16,
        policy: env.cfg.policy.clone(),
        liveness: env.cfg.liveness.clone(),
    };
    let report = vigil::tools::replay::replay(&env.cfg, &capture, &opts, &mut |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        (report.frames, report.results, report.unanswered),
        (100, 100, 0),
        "{}",
        report.render()
    );
    let cmp = report.comparison.as_ref().unwrap();
    assert_eq!(cmp.frames_compared, 100);
    assert!(
        cmp.frame_differences.is_empty() && cmp.action_differences.is_empty(),
        "{}",
        report.render()
    );
    assert!(!cmp.exceeded);
    assert!(
        !report.clients["candidate"].actions.is_empty(),
        "the stranger stretch makes the policy act"
    );

    // A stricter face-match threshold: the gate reports differences and fails.
    sigterm(&w);
    crate::support::exit_status(&mut w);
    let mut strict = worker(&env, "models-2", "0.99");
    await_consumers(&env, 1).await;
    let out = crate::support::output(
        std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args([
                "replay",
                file.to_str().unwrap(),
                "--speed",
                "max",
                "--compare",
            ])
            .env("VIGIL_NAMESPACE", &env.cfg.namespace)
            .env("VIGIL_AMQP_URL", &env.cfg.amqp_url),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("recorded ok now wrong_person"), "{text}");
    assert!(text.contains("differences exceed the tolerance"), "{text}");
    sigterm(&strict);
    crate::support::exit_status(&mut strict);
    conn.close().await;
    env.teardown().await;
    let _ = std::fs::remove_file(&file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_stopped_with_sigint_reads_back() {
    let mut env = TestEnv::new("recsigint");
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    env.add_client("c1");
    let file = std::env::temp_dir().join(format!("{}.vcap", env.cfg.namespace));
    let mut rec = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["record", "--results", "--out", file.to_str().unwrap()])
        .env("VIGIL_NAMESPACE", &env.cfg.namespace)
        .env("VIGIL_AMQP_URL", &env.cfg.amqp_url)
        .spawn()
        .unwrap();
    // Wait until the recorder's queue is bound (the file has its header).
    crate::support::eventually("the recorder to start", Duration::from_secs(10), || {
        let file = file.clone();
        async move {
            std::fs::metadata(&file)
                .ok()
                .filter(|m| m.len() > 8)
                .map(|_| ())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    let jpeg = vigil::inference::synthetic_jpeg(64, 48, 1, 0);
    for seq in 1..=10 {
        conn.send_frame(seq, 0, &jpeg).await.unwrap();
        assert!(matches!(
            conn.recv().await,
            Some(Ok(Incoming::Msg(ServerMsg::Result { .. })))
        ));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = std::process::Command::new("kill")
        .args(["-INT", &rec.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(crate::support::exit_status(&mut rec).success());
    let capture = Capture::read_file(&file).unwrap();
    let info = capture.info();
    assert_eq!(
        (info.frames, info.results, info.truncated),
        (10, 10, false),
        "{}",
        info.render()
    );
    conn.close().await;
    env.teardown().await;
    let _ = std::fs::remove_file(&file);
}

#[test]
fn the_capture_format_is_pinned_by_a_golden_file() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/capture.v1.vcap");
    let header = CaptureHeader {
        format_version: FORMAT_VERSION,
        namespace: "vigil".into(),
        started_at_ms: 1_763_777_000_000,
        tool_version: "0.1.0".into(),
        results: true,
        source: "live".into(),
    };
    let frame = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/frame.v1.msgpack"),
    )
    .unwrap();
    let result = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/result.v1.msgpack"),
    )
    .unwrap();
    let mut w = CaptureWriter::new(Vec::new(), &header).unwrap();
    w.write(&CaptureRecord {
        arrived_at_ms: 1_763_777_000_010,
        kind: RecordKind::Frame,
        event: frame,
    })
    .unwrap();
    w.write(&CaptureRecord {
        arrived_at_ms: 1_763_777_000_030,
        kind: RecordKind::Result,
        event: result,
    })
    .unwrap();
    let bytes = w.finish().unwrap();
    if std::env::var_os("VIGIL_BLESS").is_some() {
        std::fs::write(&path, &bytes).unwrap();
    }
    let golden = std::fs::read(&path).expect("golden capture (VIGIL_BLESS=1 writes it)");
    assert_eq!(
        bytes, golden,
        "this build writes a different capture format"
    );
    let capture = Capture::read(&golden[..]).unwrap();
    assert_eq!(capture.header, header);
    let info = capture.info();
    assert_eq!((info.frames, info.results), (1, 1));
    assert_eq!(info.clients.keys().collect::<Vec<_>>(), ["candidate-7"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capture_stream_exports_and_replays_the_last_minutes() {
    let mut env = TestEnv::new("stream");
    env.cfg.capture_stream = true;
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    env.add_client("c1");
    let since = vigil::wire::now_ms() - 1000;
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    let jpeg = vigil::inference::synthetic_jpeg(80, 60, 2, 0);
    for seq in 1..=20 {
        conn.send_frame(seq, 0, &jpeg).await.unwrap();
        assert!(matches!(
            conn.recv().await,
            Some(Ok(Incoming::Msg(ServerMsg::Result { .. })))
        ));
    }
    // No recording was planned: the stream kept the frames.
    let capture = vigil::tools::recorder::from_stream(&env.cfg, since)
        .await
        .unwrap();
    let info = capture.info();
    assert_eq!(
        (info.frames, info.clients.len()),
        (20, 1),
        "{}",
        info.render()
    );
    let file = std::env::temp_dir().join(format!("{}.vcap", env.cfg.namespace));
    vigil::tools::recorder::write_capture(&capture, &file).unwrap();
    assert_eq!(Capture::read_file(&file).unwrap().records.len(), 20);
    let opts = ReplayOptions {
        speed: Speed::Max,
        compare: false,
        tolerance: 0.0,
        max_inflight: 8,
        policy: env.cfg.policy.clone(),
        liveness: env.cfg.liveness.clone(),
    };
    let report = vigil::tools::replay::replay(&env.cfg, &capture, &opts, &mut |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        (report.frames, report.results),
        (20, 20),
        "{}",
        report.render()
    );
    conn.close().await;
    env.teardown().await;
    let _ = std::fs::remove_file(&file);
}
