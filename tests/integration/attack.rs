//! `vigil attack`, the real binary, against an edge and a real `identity` worker process:
//! hostile sockets from several source addresses while legitimate clients stream, then the
//! hostile JPEG set at 30 fps. The figures it prints are for operators; this test checks what
//! must hold whatever the machine: every hostile socket is closed, every frame gets the
//! answer its kind calls for, legitimate clients keep getting results, no worker restarts.

use std::time::Duration;

use crate::identity::root;
use crate::support::{TOKEN, TestEnv, await_consumers, exit_status, spawn_worker_process};

/// A child process killed when the test ends, passing or not.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vigil_attack_closes_every_hostile_socket_and_answers_every_hostile_frame() {
    let mut env = TestEnv::new("attack");
    env.cfg.edge.hello_timeout_ms = 1000;
    env.cfg.edge.ping_interval_ms = 500;
    env.cfg.edge.idle_timeout_ms = 2000;
    // Small enough that spreading 150 sockets over 4 addresses meets it.
    env.cfg.edge.max_unauthenticated_per_source = 16;
    // A 16-megapixel frame through a debug build's decoder and resizer takes seconds; the
    // test is about answers, not speed.
    env.cfg.edge.frame_deadline_ms = 60_000;
    let url = env.start_edge("e1").await;
    let models = root().join("models");
    let ort = std::env::var("VIGIL_ORT_DYLIB").ok();
    let mut worker_env = vec![
        ("VIGIL_ANALYZER", "identity"),
        ("VIGIL_MODELS_DIR", models.to_str().unwrap()),
        ("VIGIL_WORKER_ANALYSIS_THREADS", "2"),
    ];
    if let Some(ort) = &ort {
        worker_env.push(("VIGIL_ORT_DYLIB", ort));
    }
    let worker = Reaped(spawn_worker_process(&env, "w1", &worker_env));
    await_consumers(&env, 1).await;

    let report_path = env.clients_dir.with_extension("attack.json");
    let report_file = std::fs::File::create(&report_path).unwrap();
    let mut attack = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .env("VIGIL_CLIENTS_DIR", &env.clients_dir)
        .env("RUST_LOG", "warn")
        .args([
            "attack",
            "--url",
            &url,
            "--token",
            TOKEN,
            "--create-clients",
        ])
        .args([
            "--legit-clients",
            "3",
            "--legit-fps",
            "2",
            "--unloaded",
            "3s",
        ])
        .args(["--sockets", "150", "--sources", "4", "--hold", "6s"])
        .args(["--jpeg-fps", "30", "--jpeg-duration", "5s", "--json"])
        .args(["--worker-pid", &worker.0.id().to_string()])
        .stdout(report_file)
        .spawn()
        .unwrap();
    let status = exit_status(&mut attack);
    let text = std::fs::read_to_string(&report_path).unwrap();
    let report: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("attack exited {status} without a report ({e}): {text}"));

    // Legitimate clients connected and got results, unloaded and under attack.
    for phase in ["unloaded", "under_attack"] {
        let r = &report[phase];
        assert!(r["results"].as_u64().unwrap() > 0, "{phase}: {r}");
        assert_eq!(r["errors"].as_u64().unwrap(), 0, "{phase}: {r}");
    }
    // Every hostile socket was opened and closed by the edge: none is still open.
    let sockets = report["sockets"].as_array().unwrap();
    assert_eq!(sockets.len(), 3);
    let mut total = 0;
    for k in sockets {
        assert_eq!(k["still_open"].as_u64().unwrap(), 0, "{k}");
        assert_eq!(k["connect_failed"].as_u64().unwrap(), 0, "{k}");
        total += k["sockets"].as_u64().unwrap();
    }
    assert_eq!(total, 150);
    assert_eq!(report["sources"].as_u64().unwrap(), 4);

    // Every hostile frame was answered, each as its kind calls for, and the worker lived.
    let j = &report["jpegs"];
    assert!(j["sent"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(j["unanswered"].as_u64().unwrap(), 0, "{j}");
    assert_eq!(j["unexpected"].as_array().unwrap().len(), 0, "{j}");
    assert_eq!(j["worker_restarts"].as_u64().unwrap(), 0, "{j}");
    // Each frame alone after the stream: its answer cannot be a load answer.
    let probe = j["probe"].as_object().unwrap();
    let got = |frame: &str, answer: &str| probe[frame].as_str().unwrap().starts_with(answer);
    assert!(
        got("declares_23170x23170", "dropped frame_too_large"),
        "{j}"
    );
    assert!(
        got(
            "twelve_bit",
            "dropped not_jpeg: unsupported JPEG: 12-bit samples"
        ),
        "{j}"
    );
    assert!(
        got("arithmetic_coded", "dropped not_jpeg: unsupported JPEG"),
        "{j}"
    );
    assert!(
        got(
            "progressive_600_scans",
            "dropped not_jpeg: more than 64 scans"
        ),
        "{j}"
    );
    assert!(
        got("truncated_at_55_percent", "dropped not_jpeg: truncated"),
        "{j}"
    );
    assert!(
        got(
            "declares_4096x4096_in_300_bytes",
            "dropped not_jpeg: truncated"
        ),
        "{j}"
    );
    assert!(
        got("garbage_after_soi", "dropped not_jpeg: not a JPEG"),
        "{j}"
    );
    for valid in [
        "progressive",
        "cmyk",
        "restart_marker_every_mcu",
        "grey",
        "real_frame_declaring_4096x4096",
    ] {
        assert!(got(valid, "result"), "{valid} was never analysed: {j}");
    }
    let mut worker = worker;
    assert!(
        worker.0.try_wait().unwrap().is_none(),
        "the worker exited under the hostile frames"
    );
    drop(worker);
    let _ = std::fs::remove_file(&report_path);
    tokio::time::sleep(Duration::from_millis(100)).await;
    env.teardown().await;
}
