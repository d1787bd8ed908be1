//! A three-node RabbitMQ cluster on this machine (private nodes, one Erlang cookie, joined with
//! `rabbitmqctl join_cluster`), two edges and three workers given every node's URL, and one
//! node stopped while ten clients stream. The topology is the built-in one: the work and audit
//! queues are quorum queues, replicated on every node.
//!
//! Figures (how long until every client is answered again) are printed, not asserted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use uuid::Uuid;
use vigil::audit;

use crate::actions::publish_actions;
use crate::support::{PrivateBroker, TestEnv, eventually, stream_through};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_a_node_while_ten_clients_stream() {
    const CLIENTS: usize = 10;
    let nodes = PrivateBroker::start_cluster(3).await;
    let mut env = TestEnv::new("rmqcluster");
    env.cfg.amqp_url = nodes
        .iter()
        .map(PrivateBroker::url)
        .collect::<Vec<_>>()
        .join(",");
    std::fs::create_dir_all(&env.clients_dir).unwrap();
    let evidence = env.clients_dir.join("evidence");
    env.cfg.evidence_dir = evidence.clone();

    let urls = [
        env.start_edge("edge-a").await,
        env.start_edge("edge-b").await,
    ];
    for w in ["w1", "w2", "w3"] {
        env.start_worker(w).await;
    }
    // Actions confirmed before the loss wait in the audit queue (a quorum queue).
    let ns = env.cfg.namespace.clone();
    let mut confirmed = publish_actions(&env.cfg.amqp_url, &ns, 0, 20).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::new();
    for i in 0..CLIENTS {
        let id = format!("s{i}");
        env.add_client(&id);
        let answers = Arc::new(AtomicU64::new(0));
        let last = Arc::new(std::sync::Mutex::new(Instant::now()));
        let task = stream_through(
            urls[i % 2].clone(),
            id,
            answers.clone(),
            last.clone(),
            stop.clone(),
        );
        streams.push((answers, last, task));
    }
    eventually("every client answered", Duration::from_secs(30), || async {
        streams
            .iter()
            .all(|(n, _, _)| n.load(Ordering::Relaxed) > 3)
            .then_some(())
    })
    .await;

    // Stop the node that leads the audit queue, if the cluster says which; else the first.
    let audit_queue = format!("{ns}.audit");
    let leaders = nodes[0].ctl_output(&[
        "list_queues",
        "--quiet",
        "--no-table-headers",
        "name",
        "leader",
    ]);
    let leader = leaders
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(audit_queue.as_str())).then(|| words.next().map(str::to_owned))?
        })
        .and_then(|name| nodes.iter().position(|n| n.node == name))
        .unwrap_or(0);
    let counts: Vec<u64> = streams
        .iter()
        .map(|(n, _, _)| n.load(Ordering::Relaxed))
        .collect();
    let stopped = Instant::now();
    nodes[leader].stop();
    let recovered = eventually(
        "every client answered again after the node loss",
        Duration::from_secs(90),
        || async {
            streams
                .iter()
                .zip(&counts)
                .all(|((n, last, _), before)| {
                    n.load(Ordering::Relaxed) > before + 3 && *last.lock().unwrap() > stopped
                })
                .then_some(stopped.elapsed())
        },
    )
    .await;
    println!(
        "broker cluster: with node {} of 3 stopped, all {CLIENTS} clients were answered again \
         within {:.1} s",
        leader + 1,
        recovered.as_secs_f64()
    );
    // Actions confirmed while a node is down are kept too.
    confirmed.extend(publish_actions(&env.cfg.amqp_url, &ns, 20, 40).await);

    // The node returns; the cluster serves on.
    nodes[leader].boot().await;
    let counts: Vec<u64> = streams
        .iter()
        .map(|(n, _, _)| n.load(Ordering::Relaxed))
        .collect();
    eventually(
        "clients answered after the node returned",
        Duration::from_secs(60),
        || async {
            streams
                .iter()
                .zip(&counts)
                .all(|((n, _, _), before)| n.load(Ordering::Relaxed) > before + 3)
                .then_some(())
        },
    )
    .await;
    confirmed.extend(publish_actions(&env.cfg.amqp_url, &ns, 40, 60).await);

    // The audit writer finds every confirmed action, once.
    let registry = prometheus::Registry::new();
    let writer = audit::start(env.cfg.clone(), registry, env.shutdown.clone())
        .await
        .unwrap();
    let logged = eventually(
        "every confirmed action logged",
        Duration::from_secs(60),
        || {
            let evidence = evidence.clone();
            let want = confirmed.len();
            async move {
                let records = audit::records(&evidence).ok()?;
                (records.len() >= want).then_some(records)
            }
        },
    )
    .await;
    let mut logged: Vec<Uuid> = logged.iter().map(|r| r.action_id).collect();
    logged.sort();
    confirmed.sort();
    assert_eq!(logged, confirmed, "0 confirmed actions lost, none twice");

    stop.store(true, Ordering::Relaxed);
    for (_, _, task) in streams {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    env.shutdown.cancel();
    let _ = writer.join().await;
    env.teardown().await;
    for node in &nodes {
        node.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_serve_at_least_2_5_times_one_against_the_cluster() {
    let nodes = PrivateBroker::start_cluster(3).await;
    let mut env = TestEnv::new("clusterscale");
    env.cfg.amqp_url = nodes
        .iter()
        .map(PrivateBroker::url)
        .collect::<Vec<_>>()
        .join(",");
    let ratio = crate::scaling::one_then_three_workers(env).await;
    assert!(
        ratio >= 2.5,
        "against the cluster, throughput rose only {ratio:.2}x from 1 to 3 workers"
    );
    for node in &nodes {
        node.stop();
    }
}
