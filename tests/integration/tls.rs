//! `wss://`: a whole session over TLS, with a certificate from the test's own CA, and a
//! certificate swapped on disk while the edge runs.

use std::time::Duration;

use vigil::edge::client::{Connection, Incoming};
use vigil::inference::synthetic_jpeg;
use vigil::wire::client::{Encoding, ServerMsg};

use crate::support::{TOKEN, TestEnv, eventually};

/// A CA (its certificate as PEM) and a server certificate and key it signed for 127.0.0.1.
pub(crate) fn ca_and_server() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// A certificate from a fresh CA written to files the edge is configured with: the folder,
/// the certificate and key paths, and the CA's PEM.
fn edge_certificate(
    env: &mut TestEnv,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    String,
) {
    let dir = std::env::temp_dir().join(format!("{}-tls", env.cfg.namespace));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("edge.pem"), dir.join("edge.key"));
    let (ca, cert, key) = ca_and_server();
    std::fs::write(&cert_path, &cert).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    env.cfg.edge.tls_cert = Some(cert_path.clone());
    env.cfg.edge.tls_key = Some(key_path.clone());
    (dir, cert_path, key_path, ca)
}

async fn session(url: &str, ca: &str) -> Result<ServerMsg, String> {
    let mut conn = Connection::open_tls(url, Encoding::MsgPack, ca.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    conn.authenticate("c1", TOKEN)
        .await
        .map_err(|e| e.to_string())?;
    conn.send_frame(1, 0, &synthetic_jpeg(64, 48, 2, 0))
        .await
        .map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(Duration::from_secs(10), conn.recv())
        .await
        .map_err(|_| "no answer".to_owned())?;
    conn.close().await;
    match answer {
        Some(Ok(Incoming::Msg(m @ ServerMsg::Result { .. }))) => Ok(m),
        other => Err(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_runs_over_wss_and_a_new_certificate_is_picked_up_without_a_restart() {
    let mut env = TestEnv::new("tls");
    let (dir, cert_path, key_path, ca1) = edge_certificate(&mut env);
    let url = env.start_edge("e1").await.replace("ws://", "wss://");
    env.start_worker("w1").await;
    env.add_client("c1");

    // A whole session over TLS: hello, a frame, its result.
    session(&url, &ca1).await.unwrap();
    // Plain ws:// to a TLS edge gets nowhere.
    let plain = url.replace("wss://", "ws://");
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&plain, "c1", TOKEN, Encoding::Json),
    )
    .await
    .unwrap();
    assert!(
        refused.is_err(),
        "a plain connection to the TLS listener worked"
    );
    // A client that does not trust the edge's CA refuses it.
    let (other_ca, _, _) = ca_and_server();
    assert!(session(&url, &other_ca).await.is_err());

    // The certificate is renewed on disk (by a new CA, to tell them apart): new connections
    // get it, with no restart.
    let (ca2, cert2, key2) = ca_and_server();
    std::fs::write(&key_path, &key2).unwrap();
    std::fs::write(&cert_path, &cert2).unwrap();
    eventually(
        "the new certificate served",
        Duration::from_secs(10),
        || {
            let (url, ca2) = (url.clone(), ca2.clone());
            async move { session(&url, &ca2).await.ok() }
        },
    )
    .await;
    assert!(
        session(&url, &ca1).await.is_err(),
        "the old certificate is still served"
    );
    // A broken certificate file is refused and the good one kept.
    std::fs::write(&cert_path, "not a certificate").unwrap();
    session(&url, &ca2).await.unwrap();
    env.teardown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_and_a_worker_talk_to_rabbitmq_over_amqps() {
    use crate::support::PrivateBroker;
    use prometheus::Registry;
    use vigil::broker::Broker;
    use vigil::metrics::BrokerMetrics;

    let (ca, cert, key) = ca_and_server();
    let rabbit = PrivateBroker::start_tls(&cert, &key).await;
    let mut env = TestEnv::new("amqps");
    let dir = std::env::temp_dir().join(format!("{}-amqps", env.cfg.namespace));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, &ca).unwrap();
    env.cfg.amqp_url = rabbit.tls_url(&ca_path);
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    env.add_client("c1");

    // A whole session: its frame goes to the worker and its result comes back, over amqps://.
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    conn.send_frame(1, 0, &synthetic_jpeg(64, 48, 2, 0))
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), conn.recv()).await;
    assert!(
        matches!(
            answer,
            Ok(Some(Ok(Incoming::Msg(ServerMsg::Result { .. }))))
        ),
        "{answer:?}"
    );
    conn.close().await;

    // RabbitMQ itself says every connection it holds is TLS: the edge's and the worker's.
    let listed = rabbit.ctl_output(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "client_properties",
        "ssl",
    ]);
    let rows: Vec<(&str, &str)> = listed.lines().filter_map(|l| l.rsplit_once('\t')).collect();
    assert!(rows.len() >= 2, "connections: {listed}");
    assert!(rows.iter().all(|(_, ssl)| *ssl == "true"), "{listed}");
    for who in ["e1", "w1"] {
        assert!(
            rows.iter().any(|(name, _)| name.contains(who)),
            "no connection from {who}: {listed}"
        );
    }

    // A client that trusts another CA refuses the node's certificate, with a clear error.
    let (other_ca, _, _) = ca_and_server();
    let other_path = dir.join("other-ca.pem");
    std::fs::write(&other_path, &other_ca).unwrap();
    let refused = Broker::connect(
        &rabbit.tls_url(&other_path),
        "untrusting",
        BrokerMetrics::new(&Registry::new()),
    )
    .await;
    assert!(
        refused.is_err(),
        "a certificate from an unknown CA was accepted"
    );
    // A CA file that is not there is named in the error.
    let missing = dir.join("missing.pem");
    let err = Broker::connect(
        &rabbit.tls_url(&missing),
        "no-ca",
        BrokerMetrics::new(&Registry::new()),
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("missing.pem"), "{err}");

    env.teardown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_speaks_https_with_the_edge_certificate_and_stalled_handshakes_hold_no_one_up()
 {
    use crate::support::https;
    const ADMIN: &str = "admin-secret-for-https";
    let mut env = TestEnv::new("admintls");
    let (dir, cert_path, key_path, ca1) = edge_certificate(&mut env);
    env.cfg.edge.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    env.cfg.edge.admin_token = Some(ADMIN.into());
    env.cfg.edge.hello_timeout_ms = 1000;
    env.start_edge("e1").await;
    env.add_client("c1");
    let admin = env.edges[0].admin_addr.unwrap();

    let (status, body) = https(admin, &ca1, "GET", "/v1/admin/clients", Some(ADMIN), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"c1\""), "{body}");
    let (status, _) = https(admin, &ca1, "GET", "/v1/admin/clients", None, None)
        .await
        .unwrap();
    assert_eq!(status, 401);
    // Plain HTTP gets no answer from the HTTPS listener.
    let plain = crate::support::http_get(admin, "/v1/admin/clients").await;
    assert!(
        plain.as_ref().is_ok_and(|(status, _)| *status == 0) || plain.is_err(),
        "{plain:?}"
    );

    // 100 sockets from one address that open and never start a handshake: the address's share
    // (64) hold places and are dropped after the handshake timeout, the rest are closed as
    // they are accepted; the API still answers another address.
    let mut stalled = Vec::new();
    for _ in 0..100 {
        stalled.push(
            crate::support::connect_from(std::net::IpAddr::from([127, 0, 0, 2]), admin)
                .await
                .unwrap(),
        );
    }
    let (status, _) = https(admin, &ca1, "GET", "/v1/admin/sessions", Some(ADMIN), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let metrics = env.edges[0].metrics_addr;
    eventually(
        "stalled handshakes dropped",
        Duration::from_secs(20),
        || async {
            let (_, text) = crate::support::http_get(metrics, "/metrics").await.ok()?;
            let failed = text
                .lines()
                .find_map(|l| l.strip_prefix("vigil_edge_admin_tls_failures_total "))?
                .trim()
                .parse::<u64>()
                .ok()?;
            let per_address = crate::support::metric_value(
                &text,
                r#"vigil_edge_admin_connections_refused_total{reason="per_address"}"#,
            );
            (failed >= 64 && per_address >= 36.0).then_some(())
        },
    )
    .await;
    drop(stalled);

    // A renewed certificate is picked up without a restart.
    let (ca2, cert2, key2) = ca_and_server();
    std::fs::write(&key_path, &key2).unwrap();
    std::fs::write(&cert_path, &cert2).unwrap();
    eventually("the new admin certificate", Duration::from_secs(10), || {
        let ca2 = ca2.clone();
        async move {
            https(admin, &ca2, "GET", "/v1/admin/sessions", Some(ADMIN), None)
                .await
                .ok()
                .filter(|(s, _)| *s == 200)
        }
    })
    .await;
    env.teardown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
