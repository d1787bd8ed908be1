//! Scaling by replica count, and a graceful worker stop, with real worker processes running the
//! `delay` analyzer (a fixed 20 ms service time per frame, one analysis thread each).

use std::time::Duration;

use crate::support::{TestEnv, await_consumers, closed_loop, sigterm, spawn_worker_process};

const DELAY_WORKER: &[(&str, &str)] = &[
    ("VIGIL_ANALYZER", "delay"),
    ("VIGIL_DELAY_MS", "20"),
    ("VIGIL_WORKER_ANALYSIS_THREADS", "1"),
    ("VIGIL_WORKER_PREFETCH", "2"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_serve_at_least_2_5_times_one() {
    let env = TestEnv::new("scale");
    let ratio = one_then_three_workers(env).await;
    assert!(
        ratio >= 2.5,
        "throughput rose only {ratio:.2}x from 1 to 3 workers"
    );
}

/// Closed-loop throughput through one edge with one `delay` worker, then three: the ratio.
/// Every frame is answered exactly once either way.
pub(crate) async fn one_then_three_workers(mut env: TestEnv) -> f64 {
    env.cfg.edge.max_inflight = 4;
    let url = env.start_edge("e1").await;
    for i in 0..6 {
        env.add_client(&format!("s{i}"));
    }
    let mut workers = vec![spawn_worker_process(&env, "w1", DELAY_WORKER)];
    await_consumers(&env, 1).await;
    let one = closed_loop(&url, "s", 6, 4, Duration::from_secs(4)).await;

    workers.push(spawn_worker_process(&env, "w2", DELAY_WORKER));
    workers.push(spawn_worker_process(&env, "w3", DELAY_WORKER));
    await_consumers(&env, 3).await;
    let three = closed_loop(&url, "s", 6, 4, Duration::from_secs(4)).await;

    let ratio = three.results_per_s() / one.results_per_s();
    println!(
        "scaling: 1 worker {:.1} results/s, 3 workers {:.1} results/s, ratio {ratio:.2}",
        one.results_per_s(),
        three.results_per_s()
    );
    for report in [&one, &three] {
        report.assert_each_answered_once();
    }
    for w in &workers {
        sigterm(w);
    }
    for mut w in workers {
        assert!(crate::support::exit_status(&mut w).success());
    }
    env.teardown().await;
    ratio
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_sigterm_loses_nothing() {
    let mut env = TestEnv::new("sigterm");
    env.cfg.edge.max_inflight = 4;
    let url = env.start_edge("e1").await;
    for i in 0..4 {
        env.add_client(&format!("g{i}"));
    }
    let mut leaving = spawn_worker_process(&env, "leaving", DELAY_WORKER);
    let staying = spawn_worker_process(&env, "staying", DELAY_WORKER);
    await_consumers(&env, 2).await;

    let load = tokio::spawn({
        let url = url.clone();
        async move { closed_loop(&url, "g", 4, 4, Duration::from_secs(4)).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sigterm(&leaving);
    let stopped = tokio::task::spawn_blocking(move || crate::support::exit_status(&mut leaving))
        .await
        .unwrap();
    assert!(
        stopped.success(),
        "the stopped worker exited with {stopped:?}"
    );

    let report = load.await.unwrap();
    println!(
        "graceful stop: {} frames sent, {} results, {} dropped, {} duplicates, {} missing",
        report.sent,
        report.results,
        report.dropped.len(),
        report.duplicates.len(),
        report.missing.len()
    );
    assert!(report.sent > 100, "too little traffic: {}", report.sent);
    report.assert_each_answered_once();
    let edge = &env.edge_registries[0];
    assert_eq!(
        crate::support::metric(edge, "vigil_edge_results_duplicate_total", None),
        0.0
    );
    sigterm(&staying);
    let mut staying = staying;
    assert!(crate::support::exit_status(&mut staying).success());
    env.teardown().await;
}

/// A worker that takes frames in batches (`worker.batch_max`) answers every frame exactly once,
/// and does batch them when frames wait for its one analysis thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batching_worker_answers_every_frame_once() {
    let mut env = TestEnv::new("batch");
    env.cfg.worker.analyzer = "delay".into();
    env.cfg.worker.delay_ms = 10;
    env.cfg.worker.analysis_threads = 1;
    env.cfg.worker.prefetch = 8;
    env.cfg.worker.batch_max = 4;
    env.cfg.worker.batch_wait_ms = 5;
    env.cfg.edge.max_inflight = 4;
    env.start_worker("w1").await;
    let url = env.start_edge("e1").await;
    for i in 0..4 {
        env.add_client(&format!("b{i}"));
    }
    let report = closed_loop(&url, "b", 4, 4, Duration::from_secs(3)).await;
    report.assert_each_answered_once();
    let family = env.worker_registries[0]
        .gather()
        .into_iter()
        .find(|f| f.name() == "vigil_worker_batch_frames")
        .expect("the batch sizes are exported");
    let h = family.get_metric()[0].get_histogram();
    let (frames, batches) = (h.get_sample_sum(), h.get_sample_count());
    assert_eq!(
        frames as u64, report.results,
        "every frame went through a batch"
    );
    assert!(
        frames > batches as f64,
        "{frames} frames in {batches} batches: none held more than one"
    );
    println!(
        "batching: {} frames in {batches} batches ({:.2} per batch)",
        frames,
        frames / batches as f64
    );
    env.teardown().await;
}
