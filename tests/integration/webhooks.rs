//! Webhooks to the exam platform: every audited entry, POSTed by the real audit writer through
//! the real broker to a real HTTP(S) receiver, signed as Standard Webhooks says, retried from
//! the broker's delay queues, given up on into `webhooks.failed`, and re-sent with
//! `vigil webhooks retry`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use vigil::edge::client::{Connection, Incoming};
use vigil::wire::client::{Encoding, ServerMsg};

use crate::support::{TOKEN, TestEnv, eventually, http, output};

const ADMIN_TOKEN: &str = "admin-token-0123456789";

/// One request the receiver took, and what it answered.
#[derive(Debug, Clone)]
struct Hit {
    headers: HashMap<String, String>,
    body: String,
    status: u16,
}

/// An exam platform's webhook endpoint: records every request; with `flaky`, answers 503 to
/// the first try of each webhook id; with `fail_every` N > 0, answers 500 to every Nth
/// request; answers 500 to all while `down`. `stop` closes its port, `restart` opens it again;
/// what it recorded stays, as a platform keeps its store across a restart.
#[derive(Clone)]
struct Receiver {
    url: String,
    addr: std::net::SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    flaky: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    fail_every: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    listening: Arc<Mutex<tokio_util::sync::CancellationToken>>,
}

impl Receiver {
    /// Listen on 127.0.0.1; HTTPS with `tls` (certificate and key PEM).
    async fn start(tls: Option<(String, String)>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let me = Self {
            url: format!("{scheme}://127.0.0.1:{}/hooks/vigil", addr.port()),
            addr,
            hits: Arc::default(),
            flaky: Arc::default(),
            down: Arc::default(),
            fail_every: Arc::default(),
            requests: Arc::default(),
            listening: Arc::default(),
        };
        let acceptor = tls.map(|(cert, key)| {
            use tokio_rustls::rustls;
            use tokio_rustls::rustls::pki_types::pem::PemObject;
            use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(|c| c.unwrap())
                    .collect();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        me.listen(listener, acceptor);
        me
    }

    /// Plain HTTP only: stop accepting (the port is closed; requests are refused).
    fn stop(&self) {
        self.listening.lock().unwrap().cancel();
    }

    /// Plain HTTP only: listen on the same port again.
    async fn restart(&self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        *self.listening.lock().unwrap() = tokio_util::sync::CancellationToken::new();
        self.listen(listener, None);
    }

    fn listen(
        &self,
        listener: tokio::net::TcpListener,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
    ) {
        let server = self.clone();
        let stop = self.listening.lock().unwrap().clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop.cancelled() => return,
                };
                let Ok((stream, _)) = accepted else {
                    return;
                };
                let (server, acceptor) = (server.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(s) = a.accept(stream).await {
                                server.serve(s).await;
                            }
                        }
                        None => server.serve(stream).await,
                    }
                });
            }
        });
    }

    /// Read one HTTP/1.1 request, record it, answer, close.
    async fn serve(&self, mut stream: impl AsyncRead + AsyncWrite + Unpin) {
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let (headers, body_at, length) = loop {
            let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
            else {
                return;
            };
            if n == 0 {
                return;
            }
            raw.extend_from_slice(&buf[..n]);
            let mut parsed = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut parsed);
            if let Ok(httparse::Status::Complete(at)) = req.parse(&raw) {
                let headers: HashMap<String, String> = req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let length = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0usize);
                break (headers, at, length);
            }
        };
        while raw.len() < body_at + length {
            let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
            else {
                return;
            };
            if n == 0 {
                return;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        let status = {
            let mut hits = self.hits.lock().unwrap();
            let id = headers.get("webhook-id").cloned().unwrap_or_default();
            let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
            let every = self.fail_every.load(Ordering::SeqCst);
            let status =
                if self.down.load(Ordering::SeqCst) || (every > 0 && n.is_multiple_of(every)) {
                    500
                } else if self.flaky.load(Ordering::SeqCst)
                    && !hits
                        .iter()
                        .any(|h| h.headers.get("webhook-id") == Some(&id))
                {
                    503
                } else {
                    200
                };
            hits.push(Hit {
                headers,
                body: String::from_utf8_lossy(&raw[body_at..body_at + length]).into_owned(),
                status,
            });
            status
        };
        let answer =
            format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

/// The receiver's side of the signature check, as docs/webhooks.md tells an integrator to do
/// it: HMAC-SHA256 over `id.timestamp.body` with the secret's bytes, compared with each `v1,`
/// signature in the header.
fn signed(secret: &str, hit: &Hit) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    let signed = format!(
        "{}.{}.{}",
        hit.headers["webhook-id"], hit.headers["webhook-timestamp"], hit.body
    );
    mac.update(signed.as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    hit.headers["webhook-signature"]
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

/// The same check by the Standard Webhooks reference implementation, its Python package
/// (`standardwebhooks`, installed by scripts/test.sh): true when it accepts the request.
fn reference_verifies(secret: &str, hit: &Hit) -> bool {
    reference_verifies_all(secret, std::slice::from_ref(hit)) == 1
}

fn with_webhooks(env: &mut TestEnv, url: &str) -> String {
    let secret = vigil::webhooks::Secret::generate();
    env.cfg.webhooks.urls = url.parse().unwrap();
    env.cfg.webhooks.secret = Some(secret.clone());
    env.cfg.webhooks.timeout_ms = 3_000;
    env.cfg.evidence_dir = env.clients_dir.join("evidence");
    secret
}

/// The `seq` and `hash` of the log entry whose record has `id` (an action's or a note's).
fn log_entry(dir: &std::path::Path, id: &str) -> Option<(u64, String)> {
    let log = std::fs::read_to_string(dir.join("audit.log")).ok()?;
    log.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let r = &v["record"];
        (r["action_id"] == id || r["entry_id"] == id).then(|| {
            (
                v["seq"].as_u64().unwrap(),
                v["hash"].as_str().unwrap().to_owned(),
            )
        })
    })
}

fn cli(env: &TestEnv, args: &[&str]) -> String {
    let out = output(
        std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
            .arg("webhooks")
            .args(args)
            .env("VIGIL_NAMESPACE", &env.cfg.namespace)
            .env("VIGIL_AMQP_URL", &env.cfg.amqp_url),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "vigil webhooks {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enforced_action_reaches_the_exam_platform_signed_over_https_after_a_failed_try() {
    let (ca, cert, key) = crate::tls::ca_and_server();
    let receiver = Receiver::start(Some((cert, key))).await;
    // The platform is flaky: each webhook's first try gets a 503, the next one goes through.
    receiver.flaky.store(true, Ordering::SeqCst);
    let mut env = TestEnv::new("webhooks");
    let secret = with_webhooks(&mut env, &receiver.url);
    env.cfg.webhooks.backoff_ms = vec![300];
    // The receiver's certificate is from the test's own CA, trusted through the CA file.
    let ca_file = env.clients_dir.with_extension("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    env.cfg.webhooks.ca_file = Some(ca_file.clone());
    env.cfg.edge.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    env.cfg.edge.admin_token = Some(ADMIN_TOKEN.into());
    let url = env.start_edge("e1").await;
    env.add_client("c1");
    let registry = prometheus::Registry::new();
    let writer = vigil::audit::start(env.cfg.clone(), registry.clone(), env.shutdown.clone())
        .await
        .unwrap();
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    let admin = env.edges[0].admin_addr.unwrap();
    let (status, body) = http(
        admin,
        "POST",
        "/v1/admin/clients/c1/action",
        Some(ADMIN_TOKEN),
        Some(r#"{"action":"sign_out"}"#),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let action_id = loop {
        match tokio::time::timeout(Duration::from_secs(10), conn.recv()).await {
            Ok(Some(Ok(Incoming::Msg(ServerMsg::Action { action_id, .. })))) => break action_id,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected the forced action, got {other:?}"),
        }
    };

    let r = receiver.clone();
    let id = action_id.clone();
    let delivered = eventually(
        "the action's webhook delivered",
        Duration::from_secs(20),
        || {
            let (r, id) = (r.clone(), id.clone());
            async move {
                r.hits()
                    .into_iter()
                    .find(|h| h.status == 200 && h.headers["webhook-id"] == id)
            }
        },
    )
    .await;
    let tries: Vec<Hit> = receiver
        .hits()
        .into_iter()
        .filter(|h| h.headers["webhook-id"] == action_id)
        .collect();
    assert_eq!(
        tries.iter().map(|h| h.status).collect::<Vec<_>>(),
        [503, 200],
        "one failed try, then the retry from the delay queue"
    );
    for hit in &tries {
        assert!(signed(&secret, hit), "a bad signature: {hit:?}");
        assert!(
            reference_verifies(&secret, hit),
            "standardwebhooks refused {hit:?}"
        );
        assert_eq!(hit.headers["content-type"], "application/json");
    }
    // Signed with another secret, the same request does not verify.
    let other = vigil::webhooks::Secret::generate();
    assert!(!signed(&other, &delivered));
    assert!(!reference_verifies(&other, &delivered));
    let stamp: u64 = delivered.headers["webhook-timestamp"].parse().unwrap();
    let now = vigil::wire::now_ms() / 1000;
    assert!(
        stamp <= now && now - stamp < 60,
        "timestamp {stamp}, now {now}"
    );

    // The body names the audited entry: its place and hash in the log.
    let event: serde_json::Value = serde_json::from_str(&delivered.body).unwrap();
    assert_eq!(event["type"], "action.sign_out", "{event}");
    assert_eq!(event["data"]["client_id"], "c1");
    assert_eq!(event["data"]["reason"], "admin");
    let (seq, hash) = log_entry(&env.cfg.evidence_dir, &action_id).expect("the entry is logged");
    assert_eq!(event["data"]["entry"]["id"], action_id.as_str());
    assert_eq!(event["data"]["entry"]["seq"], seq);
    assert_eq!(event["data"]["entry"]["hash"], hash.as_str());

    // The session's start and its end (the sign-out closed it) reach the platform too, each an
    // audited entry of its own.
    let r = receiver.clone();
    let (started, ended) = eventually(
        "the session's start and end delivered",
        Duration::from_secs(20),
        || {
            let r = r.clone();
            async move {
                let kinds: Vec<(Hit, serde_json::Value)> = r
                    .hits()
                    .into_iter()
                    .filter(|h| h.status == 200)
                    .filter_map(|h| {
                        let v = serde_json::from_str(&h.body).ok()?;
                        Some((h, v))
                    })
                    .collect();
                let find = |t: &str| kinds.iter().find(|(_, v)| v["type"] == t).cloned();
                Some((find("session.started")?, find("session.ended")?))
            }
        },
    )
    .await;
    for (hit, event) in [&started, &ended] {
        assert!(reference_verifies(&secret, hit), "{hit:?}");
        assert_eq!(event["data"]["client_id"], "c1");
        let id = event["data"]["entry"]["id"].as_str().unwrap();
        let (seq, hash) = log_entry(&env.cfg.evidence_dir, id).expect("the entry is logged");
        assert_eq!(event["data"]["entry"]["seq"], seq);
        assert_eq!(event["data"]["entry"]["hash"], hash.as_str());
    }
    assert_eq!(started.1["data"]["session"], ended.1["data"]["session"]);
    assert_eq!(ended.1["data"]["reason"], "signed_out", "{}", ended.1);
    assert!(started.1["data"]["reason"].is_null());
    assert!(
        crate::support::metric(
            &registry,
            "vigil_audit_webhooks_total",
            Some(("outcome", "retried"))
        ) >= 1.0
    );
    assert!(
        crate::support::metric(
            &registry,
            "vigil_audit_webhooks_total",
            Some(("outcome", "delivered"))
        ) >= 1.0
    );
    conn.close().await;
    env.shutdown.cancel();
    writer.join().await.unwrap();
    let dir = env.clients_dir.clone();
    env.teardown().await;
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(ca_file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_fills_the_failed_queue_and_retry_sends_it_again() {
    let receiver = Receiver::start(None).await;
    receiver.down.store(true, Ordering::SeqCst);
    // Another address, never configured: a job naming it must never be sent there.
    let elsewhere = Receiver::start(None).await;
    let mut env = TestEnv::new("webhooks-dead");
    let secret = with_webhooks(&mut env, &receiver.url);
    env.cfg.webhooks.max_attempts = 2;
    env.cfg.webhooks.backoff_ms = vec![200];
    let registry = prometheus::Registry::new();
    let writer = vigil::audit::start(env.cfg.clone(), registry.clone(), env.shutdown.clone())
        .await
        .unwrap();
    // An operator's operation, as an edge's admin API publishes it.
    let names = env.cfg.names();
    let broker = env.broker().await;
    let publisher = broker.publisher().await.unwrap();
    let op = vigil::wire::Envelope {
        schema: vigil::wire::SCHEMA,
        id: uuid::Uuid::now_v7(),
        source: "e1".into(),
        seq: 1,
        client_id: "c1".into(),
        produced_at_ms: vigil::wire::now_ms(),
        deadline_ms: 0,
        traceparent: vigil::wire::new_traceparent(),
        payload: vigil::wire::Payload::AdminOp(vigil::wire::AdminOpEvent {
            operation: "block".into(),
            operator: "alice".into(),
            at_ms: vigil::wire::now_ms(),
            detail: String::new(),
        }),
    };
    publisher
        .publish(&names.actions_exchange(), "", &op)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    // A job forged onto the queue, naming an endpoint that is not configured.
    let forged = vigil::webhooks::Job {
        id: "forged".into(),
        endpoint: elsewhere.url.clone(),
        body: "{}".into(),
        attempts: 0,
        created_at_ms: 0,
        last_error: None,
        last_try_at_ms: None,
    };
    publisher
        .publish_durable_json(
            &names.webhooks_exchange(),
            "deliver",
            &forged.encode(),
            "forged",
            None,
        )
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();

    // A job forged for the configured endpoint, its body naming no audited entry: never
    // signed, never sent.
    let fake_id = uuid::Uuid::now_v7().to_string();
    let made_up = vigil::webhooks::Job {
        id: fake_id.clone(),
        endpoint: receiver.url.clone(),
        body: format!(
            r#"{{"type":"admin.readmit","timestamp":"2026-01-01T00:00:00.000Z","data":{{"entry":{{"id":"{fake_id}","seq":1,"hash":"00"}},"client_id":"c1","source":"cli","at_ms":0}}}}"#
        ),
        attempts: 0,
        created_at_ms: 0,
        last_error: None,
        last_try_at_ms: None,
    };
    publisher
        .publish_durable_json(
            &names.webhooks_exchange(),
            "deliver",
            &made_up.encode(),
            &fake_id,
            None,
        )
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();

    let id = op.id.to_string();
    let env_ref = &env;
    let listed = eventually(
        "both deliveries given up on",
        Duration::from_secs(20),
        || async move {
            let text = cli(env_ref, &["list", "--json"]);
            let rows: Vec<serde_json::Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            (rows.len() == 3).then_some(rows)
        },
    )
    .await;
    let ours = listed
        .iter()
        .find(|r| r["id"] == id.as_str())
        .expect("the operation's delivery");
    assert_eq!(ours["attempts"], 2, "{ours}");
    assert_eq!(ours["last_error"], "HTTP 500", "{ours}");
    let theirs = listed
        .iter()
        .find(|r| r["id"] == "forged")
        .expect("the forged job");
    assert_eq!(theirs["last_error"], "the endpoint is no longer configured");
    assert!(
        elsewhere.hits().is_empty(),
        "a forged job reached {}",
        elsewhere.url
    );
    let unaudited = listed
        .iter()
        .find(|r| r["id"] == fake_id.as_str())
        .expect("the made-up job");
    assert_eq!(
        unaudited["last_error"],
        "it names no entry of the audit trail"
    );
    assert!(
        receiver
            .hits()
            .iter()
            .all(|h| h.headers["webhook-id"] != fake_id),
        "a made-up entry was signed and sent"
    );
    assert_eq!(
        receiver
            .hits()
            .iter()
            .filter(|h| h.headers["webhook-id"] == id)
            .count(),
        2,
        "max_attempts tries"
    );
    // Listing leaves them where they are.
    assert_eq!(cli(&env, &["list", "--json"]).lines().count(), 3);

    // The platform is back; the operator re-sends that entry's delivery.
    receiver.down.store(false, Ordering::SeqCst);
    let moved = cli(&env, &["retry", "--id", &id]);
    assert!(moved.starts_with("1 deliveries"), "{moved}");
    let r = receiver.clone();
    let delivered = eventually("the re-sent webhook", Duration::from_secs(15), || {
        let (r, id) = (r.clone(), id.clone());
        async move {
            r.hits()
                .into_iter()
                .find(|h| h.status == 200 && h.headers["webhook-id"] == id)
        }
    })
    .await;
    assert!(signed(&secret, &delivered));
    let event: serde_json::Value = serde_json::from_str(&delivered.body).unwrap();
    assert_eq!(event["type"], "admin.block");
    assert_eq!(event["data"]["operator"], "alice");
    let (seq, _) = log_entry(&env.cfg.evidence_dir, &id).expect("the note is logged");
    assert_eq!(event["data"]["entry"]["seq"], seq);
    let left = cli(&env, &["list", "--json"]);
    assert_eq!(left.lines().count(), 2, "{left}");
    assert!(left.contains("forged") && left.contains(&fake_id));
    assert!(elsewhere.hits().is_empty());

    publisher.close().await;
    broker.close().await;
    env.shutdown.cancel();
    writer.join().await.unwrap();
    let dir = env.clients_dir.clone();
    env.teardown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// How many of `hits` the Standard Webhooks reference implementation accepts, in one Python
/// run.
fn reference_verifies_all(secret: &str, hits: &[Hit]) -> usize {
    use std::io::Write as _;
    let python = std::env::var("VIGIL_WEBHOOK_VERIFIER").unwrap_or_else(|_| {
        panic!("VIGIL_WEBHOOK_VERIFIER is not set: scripts/test.sh installs standardwebhooks")
    });
    let script = "import json, sys\n\
                  from standardwebhooks import Webhook\n\
                  req = json.load(sys.stdin)\n\
                  wh = Webhook(req['secret'])\n\
                  n = 0\n\
                  for h in req['hits']:\n\
                  \x20   try:\n\
                  \x20       wh.verify(h['body'].encode(), h['headers'])\n\
                  \x20       n += 1\n\
                  \x20   except Exception as e:\n\
                  \x20       print(e, file=sys.stderr)\n\
                  print(n)\n";
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("the verifier's python runs");
    let list: Vec<serde_json::Value> = hits
        .iter()
        .map(|h| serde_json::json!({"body": h.body, "headers": h.headers}))
        .collect();
    let request = serde_json::json!({"secret": secret, "hits": list});
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Check the requests `receiver` took from the `from`th on with the reference
/// implementation; how many there were. Panics when one does not verify.
async fn check(secret: &str, receiver: &Receiver, from: usize) -> usize {
    let hits: Vec<Hit> = receiver.hits().into_iter().skip(from).collect();
    let secret = secret.to_owned();
    tokio::task::spawn_blocking(move || {
        let verified = reference_verifies_all(&secret, &hits);
        assert_eq!(verified, hits.len(), "standardwebhooks refused a request");
        verified
    })
    .await
    .unwrap()
}

/// What the audit log holds, by kind.
#[derive(Debug, Default)]
struct LogKinds {
    /// Operators' `force:*` notes.
    force_notes: u64,
    /// Actions an operator forced (origin `admin`).
    forced_actions: u64,
    starts: u64,
    ends: u64,
}

fn log_kinds(dir: &std::path::Path) -> LogKinds {
    let log = std::fs::read_to_string(dir.join("audit.log")).unwrap_or_default();
    let mut k = LogKinds::default();
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let r = &v["record"];
        match (r["kind"].as_str(), r["origin"].as_str()) {
            (Some("admin"), _)
                if r["operation"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("force:")) =>
            {
                k.force_notes += 1
            }
            (Some("session"), _) if r["event"] == "started" => k.starts += 1,
            (Some("session"), _) if r["event"] == "ended" => k.ends += 1,
            (None, Some("admin")) => k.forced_actions += 1,
            _ => {}
        }
    }
    k
}

/// Every entry id of the audit log (an action's `action_id`, a note's `entry_id`).
fn log_ids(dir: &std::path::Path) -> Vec<String> {
    let log = std::fs::read_to_string(dir.join("audit.log")).unwrap_or_default();
    log.lines()
        .filter_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let r = &v["record"];
            r["action_id"]
                .as_str()
                .or(r["entry_id"].as_str())
                .map(str::to_owned)
        })
        .collect()
}

/// A soak of the whole path: ten candidates' sessions and a stream of actions for
/// `VIGIL_SOAK_SECS` (300 unless set), to a platform that fails every third request and is
/// restarted once, through a broker restart. Every audited entry reaches it (by id, with the
/// same body on every try, each signature accepted by the reference implementation), and it
/// receives nothing that is not audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clients_for_five_minutes_reach_a_failing_restarted_receiver_through_a_broker_restart()
{
    use crate::support::PrivateBroker;
    use std::collections::{BTreeMap, BTreeSet};
    let secs: u64 = std::env::var("VIGIL_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let run = Duration::from_secs(secs);
    let rabbit = PrivateBroker::start().await;
    let receiver = Receiver::start(None).await;
    receiver.fail_every.store(3, Ordering::SeqCst);
    let mut env = TestEnv::new("webhook-soak");
    env.cfg.amqp_url = rabbit.url();
    let secret = with_webhooks(&mut env, &receiver.url);
    // Short waits, and tries enough to outlast both restarts.
    env.cfg.webhooks.backoff_ms = vec![500, 1_000, 2_000];
    env.cfg.webhooks.max_attempts = 60;
    env.cfg.webhooks.breaker_open_ms = 2_000;
    env.cfg.edge.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    env.cfg.edge.admin_token = Some(ADMIN_TOKEN.into());
    let url = env.start_edge("e1").await;
    let admin = env.edges[0].admin_addr.unwrap();
    let registry = prometheus::Registry::new();
    let writer = vigil::audit::start(env.cfg.clone(), registry.clone(), env.shutdown.clone())
        .await
        .unwrap();

    // Ten candidates, each reading everything the edge sends until told to stop.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for i in 0..10 {
        let id = format!("c{i}");
        env.add_client(&id);
        let (mut conn, _) = Connection::connect(&url, &id, TOKEN, Encoding::Json)
            .await
            .unwrap();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut actions = 0u64;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    m = conn.recv() => match m {
                        Some(Ok(Incoming::Msg(ServerMsg::Action { .. }))) => actions += 1,
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                }
            }
            conn.close().await;
            actions
        }));
    }

    // The platform restarts at a third of the run, the broker at two thirds, while actions go
    // on: forced through the admin API in turn (the policy's own path to the audit trail), one
    // every 250 ms.
    let rabbit = Arc::new(rabbit);
    let chaos = {
        let (receiver, rabbit) = (receiver.clone(), rabbit.clone());
        tokio::spawn(async move {
            tokio::time::sleep(run / 3).await;
            receiver.stop();
            tokio::time::sleep(Duration::from_secs(3)).await;
            receiver.restart().await;
            tokio::time::sleep(run / 3).await;
            rabbit.stop();
            tokio::time::sleep(Duration::from_secs(3)).await;
            rabbit.boot().await;
        })
    };
    let started = std::time::Instant::now();
    let (mut forced, mut refused) = (0u64, 0u64);
    let (mut checked, mut last_check) = (0usize, std::time::Instant::now());
    let mut n = 0u64;
    while started.elapsed() < run || !chaos.is_finished() {
        let client = format!("c{}", n % 10);
        let action = if (n / 10).is_multiple_of(2) {
            "warn"
        } else {
            "allow"
        };
        let path = format!("/v1/admin/clients/{client}/action");
        let body = format!(r#"{{"action":"{action}"}}"#);
        match tokio::time::timeout(
            Duration::from_secs(10),
            http(admin, "POST", &path, Some(ADMIN_TOKEN), Some(&body)),
        )
        .await
        {
            Ok((202, _)) => forced += 1,
            _ => refused += 1,
        }
        n += 1;
        // The reference implementation refuses a timestamp five minutes old, as a receiver
        // should: it checks the requests as they come, a minute's worth at a time.
        if last_check.elapsed() > Duration::from_secs(60) {
            checked += check(&secret, &receiver, checked).await;
            last_check = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    chaos.await.unwrap();
    stop.cancel();
    let mut received = 0;
    for c in clients {
        received += c.await.unwrap();
    }

    // Actions the edge could not hand to the broker while it was down are counted, not logged.
    let metrics = eventually("the edge's metrics", Duration::from_secs(10), || {
        let addr = env.edges[0].metrics_addr;
        async move { crate::support::http_get(addr, "/metrics").await.ok() }
    })
    .await
    .1;
    let unaudited: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vigil_edge_actions_unaudited_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64;
    // Every entry of the trail (actions, and the sessions' starts and ends) delivered.
    let dir = env.cfg.evidence_dir.clone();
    let r = receiver.clone();
    let ids = eventually(
        "every audited entry delivered",
        Duration::from_secs(120),
        || {
            let (dir, r) = (dir.clone(), r.clone());
            async move {
                let ids: BTreeSet<String> = log_ids(&dir).into_iter().collect();
                let delivered: BTreeSet<String> = r
                    .hits()
                    .into_iter()
                    .filter(|h| h.status == 200)
                    .map(|h| h.headers["webhook-id"].clone())
                    .collect();
                // Each accepted request is an operator's note and the edge's action; each
                // client, one start and one end.
                let kinds = log_kinds(&dir);
                let ends = kinds.force_notes >= forced
                    && kinds.forced_actions + unaudited >= forced
                    && kinds.starts == 10
                    && kinds.ends == 10;
                (ends && ids.is_subset(&delivered)).then_some(ids)
            }
        },
    )
    .await;
    // Nothing is still on its way.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hits = receiver.hits();
    let mut by_id: BTreeMap<&str, Vec<&Hit>> = BTreeMap::new();
    for h in &hits {
        by_id.entry(&h.headers["webhook-id"]).or_default().push(h);
    }
    let delivered: BTreeSet<String> = by_id.keys().map(|k| (*k).to_owned()).collect();
    assert_eq!(
        delivered, ids,
        "the platform got exactly the audited entries"
    );
    for (id, tries) in &by_id {
        assert!(
            tries.iter().all(|h| h.body == tries[0].body),
            "{id}: every try of an entry sends the same body"
        );
    }
    let ok: Vec<Hit> = hits.iter().filter(|h| h.status == 200).cloned().collect();
    let twice = by_id
        .values()
        .filter(|t| t.iter().filter(|h| h.status == 200).count() > 1)
        .count();
    let failed = hits.iter().filter(|h| h.status == 500).count();
    assert!(failed > 0, "the platform failed every third request");
    assert_eq!(
        unaudited, 0,
        "the broker's restart cost no action its place in the trail"
    );
    checked += check(&secret, &receiver, checked).await;
    let verified = checked;
    assert!(
        verified >= hits.len(),
        "standardwebhooks checked every request"
    );
    let kinds: BTreeMap<String, usize> = ok.iter().fold(BTreeMap::new(), |mut m, h| {
        let v: serde_json::Value = serde_json::from_str(&h.body).unwrap();
        *m.entry(v["type"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
        m
    });
    assert!(
        kinds.get("session.started").copied().unwrap_or(0) >= 10,
        "{kinds:?}"
    );
    println!(
        "webhook soak: {secs} s, 10 clients; {forced} actions forced ({refused} refused while the broker was down), {received} seen by the clients, {unaudited} unaudited; {} audited entries {kinds:?}; {} requests: {failed} failed (every third, and the receiver's restart), {} accepted, {twice} entries accepted twice (at least once; receivers dedupe by webhook-id); {verified} signatures verified by standardwebhooks",
        ids.len(),
        hits.len(),
        ok.len(),
    );

    env.shutdown.cancel();
    writer.join().await.unwrap();
    let clients_dir = env.clients_dir.clone();
    env.teardown().await;
    let _ = std::fs::remove_dir_all(clients_dir);
}
