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

/// A small OTLP/HTTP receiver (JSON encoding): every body posted to `/v1/traces`.
#[cfg(feature = "otlp")]
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    use axum::routing::post;
    let bodies: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let kept = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                if let Ok(v) = serde_json::from_slice(&body) {
                    kept.lock().unwrap().push(v);
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), bodies)
}

/// (service name, trace id) of every span the receiver got.
#[cfg(feature = "otlp")]
fn exported_spans(bodies: &[serde_json::Value]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for body in bodies {
        for rs in body["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or_default()
                .to_owned();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for span in ss["spans"].as_array().into_iter().flatten() {
                    if let Some(trace) = span["traceId"].as_str() {
                        out.push((service.clone(), trace.to_lowercase()));
                    }
                }
            }
        }
    }
    out
}

/// (The `otlp` feature, which scripts/test.sh turns on.)
#[cfg(feature = "otlp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_frames_spans_reach_an_otlp_receiver_under_one_trace_id() {
    let (endpoint, bodies) = otlp_receiver().await;
    let env = TestEnv::new("otlp");
    env.add_client("c1");
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let (mut edge, url) = crate::support::spawn_edge_process(&env, "otlp-edge", &otel);
    let mut worker_env = otel.to_vec();
    worker_env.push(("VIGIL_ANALYZER", "frame-info"));
    let mut worker = crate::support::spawn_worker_process(&env, "otlp-worker", &worker_env);
    crate::support::await_listening(&url).await;
    crate::support::await_consumers(&env, 1).await;
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    conn.send_frame(1, 0, &synthetic_jpeg(64, 48, 1, 0))
        .await
        .unwrap();
    let trace_id = loop {
        match tokio::time::timeout(Duration::from_secs(10), conn.recv()).await {
            Ok(Some(Ok(Incoming::Msg(ServerMsg::Result { trace_id, .. })))) => break trace_id,
            Ok(Some(Ok(_))) => {}
            other => panic!("no result: {other:?}"),
        }
    };
    conn.close().await;
    // The processes flush what they hold when they stop.
    crate::support::sigterm(&edge);
    crate::support::sigterm(&worker);
    crate::support::exit_status(&mut edge);
    crate::support::exit_status(&mut worker);
    let services = eventually(
        "the edge's and the worker's spans of the frame",
        Duration::from_secs(20),
        || {
            let bodies = bodies.clone();
            let trace_id = trace_id.clone();
            async move {
                let spans = exported_spans(&bodies.lock().unwrap());
                let of_frame: Vec<String> = spans
                    .into_iter()
                    .filter(|(_, t)| *t == trace_id)
                    .map(|(s, _)| s)
                    .collect();
                (of_frame.iter().any(|s| s == "vigil-edge")
                    && of_frame.iter().any(|s| s == "vigil-worker"))
                .then_some(of_frame)
            }
        },
    )
    .await;
    println!(
        "otlp: {} spans of trace {trace_id} exported ({})",
        services.len(),
        services.join(", ")
    );
    env.teardown().await;
}
