//! Metrics, health and tracing, observed from outside.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use vigil::edge::client::{Connection, Incoming};
use vigil::inference::synthetic_jpeg;
use vigil::wire::client::{Encoding, ServerMsg};

use crate::support::{TOKEN, TestEnv, eventually, free_port, http_get};

/// Value of every sample of `name` in a Prometheus text exposition, summed.
fn scrape_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_with_traffic_counts() {
    let mut env = TestEnv::new("metrics");
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    env.add_client("c1");
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    let jpeg = synthetic_jpeg(64, 48, 1, 0);
    for seq in 1..=5 {
        conn.send_frame(seq, 0, &jpeg).await.unwrap();
        assert!(matches!(
            conn.recv().await,
            Some(Ok(Incoming::Msg(ServerMsg::Result { .. })))
        ));
    }
    let edge = env.edges[0].metrics_addr;
    let worker = env.workers[0].metrics_addr;
    let (status, text) = http_get(edge, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for series in [
        "vigil_edge_sessions_active",
        "vigil_edge_frames_received_total",
        "vigil_edge_frames_published_total",
        "vigil_edge_results_delivered_total",
        "vigil_edge_frame_latency_seconds_count",
        "vigil_broker_confirm_seconds_count",
    ] {
        assert!(
            scrape_sum(&text, series) > 0.0,
            "edge series {series} is zero or missing"
        );
    }
    // Drop reasons are exported before they happen, so dashboards see a zero, not a gap.
    assert!(text.contains("vigil_edge_frames_dropped_total{reason=\"rate_limited\"} 0"));
    let (status, text) = http_get(worker, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for series in [
        "vigil_worker_frames_consumed_total",
        "vigil_worker_frames_analyzed_total",
        "vigil_worker_inference_seconds_count",
        "vigil_broker_confirm_seconds_count",
    ] {
        assert!(
            scrape_sum(&text, series) > 0.0,
            "worker series {series} is zero or missing"
        );
    }
    assert!(text.contains("vigil_worker_inference_seconds_count{model=\"frame-info\"} 5"));
    for addr in [edge, worker] {
        assert_eq!(http_get(addr, "/healthz").await.unwrap().0, 200);
        assert_eq!(http_get(addr, "/readyz").await.unwrap().0, 200);
    }
    conn.close().await;
    env.teardown().await;
}

/// Forward TCP connections on `listen` to `target`.
async fn proxy(listen: u16, target: &str) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen))
        .await
        .unwrap();
    let target = target.to_owned();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_broker() {
    let env = TestEnv::new("readyz");
    let metrics_port = free_port();
    let broker_port = free_port();
    let mut cfg = env.cfg.clone();
    cfg.metrics_listen = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    cfg.amqp_url = format!("amqp://guest:guest@127.0.0.1:{broker_port}/%2f");
    cfg.broker_connect_timeout_ms = 30_000;
    let worker = tokio::spawn(vigil::worker::start(
        cfg,
        prometheus::Registry::new(),
        env.shutdown.clone(),
    ));
    let addr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let (status, body) = eventually(
        "the metrics endpoint",
        Duration::from_secs(5),
        || async move { http_get(addr, "/readyz").await.ok() },
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("broker: not ready"), "{body}");
    assert_eq!(http_get(addr, "/healthz").await.unwrap().0, 200);

    // The broker becomes reachable: the worker connects, declares, and turns ready.
    let real = crate::support::amqp_url();
    let host = real
        .split('@')
        .nth(1)
        .and_then(|h| h.split('/').next())
        .unwrap_or("127.0.0.1:5672")
        .to_owned();
    proxy(broker_port, &host).await;
    eventually("readyz 200", Duration::from_secs(20), || async move {
        let (status, _) = http_get(addr, "/readyz").await.ok()?;
        (status == 200).then_some(())
    })
    .await;
    let handle = worker.await.unwrap().expect("worker started");
    env.shutdown.cancel();
    handle.join().await.unwrap();
    env.teardown().await;
}

/// Records the `trace_id` field of every span named `frame` (edge and worker).
#[derive(Clone, Default)]
struct SpanTraces(Arc<Mutex<Vec<(String, String)>>>);

impl<S: tracing::Subscriber> Layer<S> for SpanTraces {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: Context<'_, S>,
    ) {
        struct TraceId(Option<String>);
        impl Visit for TraceId {
            fn record_str(&mut self, field: &Field, value: &str) {
                if field.name() == "trace_id" {
                    self.0 = Some(value.to_owned());
                }
            }
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                if field.name() == "trace_id" {
                    self.0 = Some(format!("{value:?}"));
                }
            }
        }
        let mut v = TraceId(None);
        attrs.record(&mut v);
        if let (Some(id), "frame") = (v.0, attrs.metadata().name()) {
            self.0
                .lock()
                .unwrap()
                .push((attrs.metadata().target().to_owned(), id));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_and_worker_spans_share_the_trace_id() {
    let spans = SpanTraces::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone().with_filter(
        tracing_subscriber::filter::Targets::new().with_target("vigil", tracing::Level::DEBUG),
    ));
    tracing::subscriber::set_global_default(subscriber)
        .expect("only this test installs a subscriber");

    let mut env = TestEnv::new("trace");
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    env.add_client("c1");
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    conn.send_frame(1, 0, &synthetic_jpeg(64, 48, 1, 0))
        .await
        .unwrap();
    let Some(Ok(Incoming::Msg(ServerMsg::Result { trace_id, .. }))) = conn.recv().await else {
        panic!("no result")
    };
    assert_eq!(trace_id.len(), 32, "result carries its trace id");
    let seen = spans.0.lock().unwrap().clone();
    let targets: Vec<&str> = seen
        .iter()
        .filter(|(_, id)| *id == trace_id)
        .map(|(t, _)| t.as_str())
        .collect();
    assert!(
        targets.iter().any(|t| t.starts_with("vigil::edge")),
        "no edge span with {trace_id}: {seen:?}"
    );
    assert!(
        targets.iter().any(|t| t.starts_with("vigil::worker")),
        "no worker span with {trace_id}: {seen:?}"
    );
    conn.close().await;
    env.teardown().await;
}
