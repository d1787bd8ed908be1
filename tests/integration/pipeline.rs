//! The spine: clients → edge → RabbitMQ → competing workers → reply exchange → the right edge.

use std::collections::HashMap;
use std::time::Duration;

use vigil::edge::client::{Connection, Incoming};
use vigil::inference::synthetic_jpeg;
use vigil::wire::client::{Encoding, ServerMsg};
use vigil::wire::{Analysis, DropReason};

use crate::support::{TOKEN, TestEnv, metric};

/// What one client saw: for each seq, the answers it got.
#[derive(Default, Debug)]
struct Seen {
    results: HashMap<u64, u32>,
    dropped: HashMap<u64, Vec<DropReason>>,
    widths: Vec<u16>,
}

impl Seen {
    fn answers(&self, seq: u64) -> usize {
        self.results.get(&seq).copied().unwrap_or(0) as usize
            + self.dropped.get(&seq).map_or(0, Vec::len)
    }
}

/// Stream `frames` frames of a width unique to this client, then collect one answer per frame.
async fn stream(url: String, client: String, width: u32, frames: u64, encoding: Encoding) -> Seen {
    let jpeg = synthetic_jpeg(width, 120, width as u64, 0);
    let (conn, _) = Connection::connect(&url, &client, TOKEN, encoding)
        .await
        .expect("connects");
    let (mut tx, mut rx) = conn.split();
    let sender = tokio::spawn(async move {
        for seq in 1..=frames {
            tx.send_frame(seq, vigil::wire::now_ms(), &jpeg)
                .await
                .expect("send");
            // About 200 frames per second: fast enough to exercise the in-flight window.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tx
    });
    let mut seen = Seen::default();
    let mut answered = 0;
    while answered < frames {
        let msg = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{client}: no answer after {answered} of {frames}"));
        match msg {
            Some(Ok(Incoming::Msg(ServerMsg::Result { seq, analysis, .. }))) => {
                let Analysis::FrameInfo { width, .. } = analysis else {
                    panic!("{client}: expected frame-info, got {analysis:?}")
                };
                seen.widths.push(width);
                *seen.results.entry(seq).or_default() += 1;
                answered += 1;
            }
            Some(Ok(Incoming::Msg(ServerMsg::Dropped { seq, reason, .. }))) => {
                seen.dropped.entry(seq).or_default().push(reason);
                answered += 1;
            }
            other => panic!("{client}: unexpected {other:?}"),
        }
    }
    // Nothing more should arrive: no duplicates trickling in.
    let extra = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
    assert!(
        extra.is_err(),
        "{client}: unexpected extra message {extra:?}"
    );
    sender.await.unwrap().close().await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_two_workers_one_answer_per_frame() {
    let mut env = TestEnv::new("spine");
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    env.start_worker("w2").await;
    let encodings = [Encoding::MsgPack, Encoding::Json, Encoding::MsgPack];
    let mut tasks = Vec::new();
    for (i, encoding) in encodings.into_iter().enumerate() {
        let client = format!("client-{i}");
        env.add_client(&client);
        tasks.push(tokio::spawn(stream(
            url.clone(),
            client,
            160 + 16 * i as u32,
            200,
            encoding,
        )));
    }
    let mut total_results = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let seen = task.await.unwrap();
        for seq in 1..=200 {
            assert_eq!(seen.answers(seq), 1, "client {i} seq {seq}: {seen:?}");
        }
        // Every result on this socket came from this client's frames.
        let width = 160 + 16 * i as u16;
        assert!(
            seen.widths.iter().all(|w| *w == width),
            "client {i} got another client's result"
        );
        // Drops, if any, are the latest-frame-wins kind.
        for reasons in seen.dropped.values() {
            assert_eq!(reasons, &[DropReason::Superseded]);
        }
        assert!(
            seen.results.len() >= 100,
            "client {i}: only {} results",
            seen.results.len()
        );
        total_results += seen.results.len();
    }
    // Both workers competed for the work queue.
    for (i, registry) in env.worker_registries.iter().enumerate() {
        let n = metric(registry, "vigil_worker_frames_analyzed_total", None);
        assert!(n > 0.0, "worker {i} analysed nothing");
        // Acks are coalesced: one basic.ack covers every confirmed frame up to its tag. With a
        // prefetch far below the frames each worker took, consumption only went on because
        // acks did.
        let consumed = metric(registry, "vigil_worker_frames_consumed_total", None);
        let acks = metric(registry, "vigil_worker_acks_total", None);
        println!("worker {i}: {consumed} frames consumed, {acks} ack frames");
        assert!(
            acks >= 1.0 && acks <= consumed,
            "{acks} acks for {consumed} frames"
        );
    }
    let delivered = metric(
        &env.edge_registries[0],
        "vigil_edge_results_delivered_total",
        None,
    );
    assert_eq!(delivered as usize, total_results);

    // Graceful shutdown: live sessions are closed with 1001.
    env.add_client("late");
    let (mut conn, _) = Connection::connect(&url, "late", TOKEN, Encoding::Json)
        .await
        .unwrap();
    env.shutdown.cancel();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.recv()).await;
    assert!(
        matches!(closed, Ok(Some(Ok(Incoming::Closed { code: 1001, .. })))),
        "expected a 1001 close on shutdown, got {closed:?}"
    );
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_reach_only_their_own_edge() {
    let mut env = TestEnv::new("two-edges");
    let url1 = env.start_edge("edge-a").await;
    let url2 = env.start_edge("edge-b").await;
    env.start_worker("w1").await;
    env.add_client("on-a");
    env.add_client("on-b");
    let a = tokio::spawn(stream(url1, "on-a".into(), 200, 60, Encoding::MsgPack));
    let b = tokio::spawn(stream(url2, "on-b".into(), 232, 60, Encoding::MsgPack));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    for (seen, width) in [(&a, 200u16), (&b, 232u16)] {
        for seq in 1..=60 {
            assert_eq!(seen.answers(seq), 1);
        }
        assert!(seen.widths.iter().all(|w| *w == width));
    }
    // Each edge delivered exactly its own client's results and saw none of the other's.
    for (registry, seen) in env.edge_registries.iter().zip([&a, &b]) {
        let delivered = metric(registry, "vigil_edge_results_delivered_total", None);
        assert_eq!(delivered as usize, seen.results.len());
        assert_eq!(
            metric(registry, "vigil_edge_results_orphaned_total", None),
            0.0
        );
    }
    env.teardown().await;
}

/// `vigil bench transport` runs every path end to end (clients, edge, worker; the bare loop
/// through the default exchange and through Vigil's exchanges) and reports each. Only that
/// they ran is checked here: the numbers themselves are for the benchmark's reader.
#[test]
fn the_transport_benchmark_runs_every_path() {
    let out = crate::support::output(
        std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args([
                "bench",
                "transport",
                "--clients",
                "2",
                "--inflight",
                "2",
                "--frame-bytes",
                "20000",
                "--seconds",
                "1",
                "--warmup-seconds",
                "1",
                "--rounds",
                "1",
                "--json",
            ])
            .env("VIGIL_AMQP_URL", crate::support::amqp_url())
            .env("RUST_LOG", "warn"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not a JSON report ({e}): {stderr}"));
    for side in ["vigil", "bare", "bare_routed"] {
        let f = &report[side];
        assert!(
            f["frames"].as_u64().unwrap() > 0,
            "{side} moved no frames: {f}"
        );
        assert_eq!(f["dropped"].as_u64(), Some(0), "{side}: {f}");
        assert!(f["p50_ms"].as_f64().unwrap() > 0.0, "{side}: {f}");
    }
    for ratio in ["throughput_ratio", "routed_ratio"] {
        let r = report[ratio].as_f64().unwrap_or(f64::NAN);
        assert!(r.is_finite() && r > 0.0, "{ratio} = {r}");
    }
    assert_eq!(report["rounds"].as_array().map(Vec::len), Some(1));
}
