//! Short-lived session tokens through the real edge: minted by the admin API, opening a session
//! in place of the client's permanent token, and refused when expired, for another client,
//! forged, or revoked with the client.

use std::time::Duration;

use vigil::edge::client::{ClientError, Connection};
use vigil::session_tokens::{Minter, SessionConfig};
use vigil::wire::client::{Encoding, ServerMsg};

use crate::support::{TOKEN, TestEnv, http};

const ADMIN_TOKEN: &str = "admin-token-0123456789";

/// A key pair in the test's folder; the session config that uses it.
fn keys(dir: &std::path::Path, name: &str) -> SessionConfig {
    std::fs::create_dir_all(dir).unwrap();
    let key = dir.join(name);
    vigil::audit::signing::generate(&key).unwrap();
    SessionConfig {
        key: Some(key),
        ..SessionConfig::default()
    }
}

/// Open a session as `client` with `token`: the welcome, or the refusal's code.
async fn hello(url: &str, client: &str, token: &str) -> Result<(), String> {
    let attempt = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(url, client, token, Encoding::Json),
    )
    .await
    .map_err(|_| "no answer to the hello".to_owned())?;
    match attempt {
        Ok((conn, ServerMsg::Welcome { .. })) => {
            conn.close().await;
            Ok(())
        }
        Ok((_, other)) => Err(format!("not a welcome: {other:?}")),
        Err(ClientError::Refused { code, message }) => Err(format!("{code}: {message}")),
        Err(e) => Err(e.to_string()),
    }
}

async fn mint(admin: std::net::SocketAddr, body: &str) -> (u16, serde_json::Value) {
    let (status, text) = http(
        admin,
        "POST",
        "/v1/admin/sessions",
        Some(ADMIN_TOKEN),
        Some(body),
    )
    .await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minted_session_token_opens_only_its_clients_session_until_it_expires_or_is_revoked() {
    let mut env = TestEnv::new("sessions");
    let dir = env.clients_dir.with_extension("keys");
    env.cfg.sessions = keys(&dir, "session.key");
    env.cfg.edge.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    env.cfg.edge.admin_token = Some(ADMIN_TOKEN.into());
    env.add_client("c1");
    env.add_client("c2");
    let url = env.start_edge("e1").await;
    let admin = env.edges[0].admin_addr.unwrap();

    let (status, minted) = mint(admin, r#"{"client_id":"c1","ttl_s":120}"#).await;
    assert_eq!(status, 201, "{minted}");
    let token = minted["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("eyJ") && token != TOKEN);
    let expires = minted["expires_at_s"].as_u64().unwrap();
    let now = vigil::wire::now_ms();
    assert!(
        (now / 1000 + 110..=now / 1000 + 125).contains(&expires),
        "{minted}"
    );

    // It opens c1's session, and only c1's.
    hello(&url, "c1", &token).await.unwrap();
    let other = hello(&url, "c2", &token).await.unwrap_err();
    assert!(other.starts_with("unauthorized"), "{other}");
    // The permanent token still works beside it.
    hello(&url, "c1", TOKEN).await.unwrap();

    // Expired: signed with the same key, an hour and more ago.
    let record = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    let record = vigil::directory::ClientStore::get(&record, "c1")
        .unwrap()
        .unwrap();
    let minter = Minter::load(&env.cfg.sessions, &env.cfg.namespace)
        .unwrap()
        .unwrap();
    let (old, _) = minter
        .mint("c1", &record.session_binding(), 600, now - 4_000_000)
        .unwrap();
    let expired = hello(&url, "c1", &old).await.unwrap_err();
    assert_eq!(expired, "unauthorized: session token expired");
    // Forged: a well-formed token signed by another key.
    let forger_cfg = keys(&dir, "forger.key");
    let forger = Minter::load(&forger_cfg, &env.cfg.namespace)
        .unwrap()
        .unwrap();
    let (forged, _) = forger
        .mint("c1", &record.session_binding(), 600, now)
        .unwrap();
    let refused = hello(&url, "c1", &forged).await.unwrap_err();
    assert!(refused.starts_with("unauthorized"), "{refused}");
    // Another deployment's token (another namespace's audience), same key.
    let elsewhere = Minter::load(&env.cfg.sessions, "another-namespace")
        .unwrap()
        .unwrap();
    let (foreign, _) = elsewhere
        .mint("c1", &record.session_binding(), 600, now)
        .unwrap();
    assert!(
        hello(&url, "c1", &foreign)
            .await
            .unwrap_err()
            .starts_with("unauthorized")
    );

    // Revoked with the client: blocked, it is refused, and unblocking does not bring it back;
    // a token minted after the unblock works.
    let (status, body) = http(
        admin,
        "POST",
        "/v1/admin/clients/c1/block",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert!(status < 300, "{status} {body}");
    let revoked = hello(&url, "c1", &token).await.unwrap_err();
    assert!(revoked.starts_with("unauthorized"), "{revoked}");
    let blocked = hello(&url, "c1", TOKEN).await.unwrap_err();
    assert!(blocked.starts_with("blocked"), "{blocked}");
    let (status, minted_blocked) = mint(admin, r#"{"client_id":"c1"}"#).await;
    assert_eq!(
        status, 409,
        "no token for a blocked client: {minted_blocked}"
    );
    let (status, _) = http(
        admin,
        "POST",
        "/v1/admin/clients/c1/unblock",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert!(status < 300);
    let still = hello(&url, "c1", &token).await.unwrap_err();
    assert!(still.starts_with("unauthorized"), "{still}");
    let (status, fresh) = mint(admin, r#"{"client_id":"c1","ttl_s":120}"#).await;
    assert_eq!(status, 201, "{fresh}");
    let token = fresh["token"].as_str().unwrap().to_owned();
    hello(&url, "c1", &token).await.unwrap();
    // A client whose permanent token changed: every session token minted before is revoked.
    let store = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    let rekeyed =
        vigil::directory::ClientRecord::new("c1", "c1", "a-new-permanent-token-456").unwrap();
    vigil::directory::ClientStore::put(&store, &rekeyed).unwrap();
    let stale = hello(&url, "c1", &token).await.unwrap_err();
    assert!(stale.starts_with("unauthorized"), "{stale}");

    // Bad requests get clear errors.
    let (status, _) = mint(admin, r#"{"client_id":"nobody"}"#).await;
    assert_eq!(status, 404);
    let (status, body) = mint(admin, r#"{"client_id":"c2","ttl_s":99999999}"#).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = http(
        admin,
        "POST",
        "/v1/admin/sessions",
        Some("wrong"),
        Some(r#"{"client_id":"c2"}"#),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        crate::support::metric(
            &env.edge_registries[0],
            "vigil_edge_session_tokens_minted_total",
            None
        ),
        2.0
    );
    assert!(
        crate::support::metric(
            &env.edge_registries[0],
            "vigil_edge_session_tokens_refused_total",
            None
        ) >= 4.0
    );
    env.teardown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_without_a_session_key_refuses_session_tokens() {
    let mut env = TestEnv::new("sessions-off");
    env.add_client("c1");
    let url = env.start_edge("e1").await;
    let dir = env.clients_dir.with_extension("keys");
    let cfg = keys(&dir, "session.key");
    let minter = Minter::load(&cfg, &env.cfg.namespace).unwrap().unwrap();
    let store = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    let record = vigil::directory::ClientStore::get(&store, "c1")
        .unwrap()
        .unwrap();
    let (token, _) = minter
        .mint(
            "c1",
            &record.session_binding(),
            600,
            vigil::wire::now_ms() / 1000,
        )
        .unwrap();
    let refused = hello(&url, "c1", &token).await.unwrap_err();
    assert!(refused.starts_with("unauthorized"), "{refused}");
    env.teardown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// The integration example an exam platform copies (`web/examples/exam-backend.mjs`, run by
/// Node.js): it mints a session token through the admin API, sends the candidate to the page
/// with it, and receives the signed webhooks of what happens in that session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_integration_example_mints_a_token_opens_the_page_and_receives_the_webhooks() {
    let mut env = TestEnv::new("example");
    let dir = env.clients_dir.with_extension("keys");
    env.cfg.sessions = keys(&dir, "session.key");
    env.cfg.edge.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    env.cfg.edge.admin_token = Some(ADMIN_TOKEN.into());
    let port = crate::support::free_port();
    let secret = vigil::webhooks::Secret::generate();
    env.cfg.webhooks.urls = format!("http://127.0.0.1:{port}/webhooks/vigil")
        .parse()
        .unwrap();
    env.cfg.webhooks.secret = Some(secret.clone());
    env.cfg.evidence_dir = env.clients_dir.join("evidence");
    env.add_client("c1");
    let url = env.start_edge("e1").await;
    let admin = env.edges[0].admin_addr.unwrap();
    let writer = vigil::audit::start(
        env.cfg.clone(),
        prometheus::Registry::new(),
        env.shutdown.clone(),
    )
    .await
    .unwrap();
    let page = format!("http://{}/", env.edges[0].ws_addr);
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/web/examples/exam-backend.mjs");
    let mut node = tokio::process::Command::new("node")
        .arg(example)
        .env("VIGIL_ADMIN_URL", format!("http://{admin}"))
        .env("VIGIL_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("VIGIL_PAGE_URL", &page)
        .env("VIGIL_WEBHOOK_SECRET", &secret)
        .env("PORT", port.to_string())
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("node runs the example");
    crate::support::eventually("the example listening", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    vigil::telemetry::install_crypto_provider();
    let platform = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");

    // The candidate starts the exam: sent to Vigil's page with a fresh token in the fragment.
    let res = platform
        .get(format!("{base}/exam/start?candidate=c1"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 302);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let fragment = location
        .strip_prefix(&format!("{page}#client=c1&token="))
        .unwrap_or_else(|| panic!("{location}"));
    let token = fragment.to_owned();
    assert!(token.starts_with("eyJ"), "{location}");
    // An unknown candidate gets Vigil's refusal, not a page.
    let res = platform
        .get(format!("{base}/exam/start?candidate=nobody"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);

    // The page opens the session with it; an operator warns the candidate.
    let (conn, welcome) = Connection::connect(&url, "c1", &token, Encoding::Json)
        .await
        .unwrap();
    assert!(matches!(welcome, ServerMsg::Welcome { .. }));
    let (status, body) = http(
        admin,
        "POST",
        "/v1/admin/clients/c1/action",
        Some(ADMIN_TOKEN),
        Some(r#"{"action":"warn"}"#),
    )
    .await;
    assert_eq!(status, 202, "{body}");

    // The platform hears of the session's start, the minting and the warning, each verified.
    let events =
        crate::support::eventually("the example's webhooks", Duration::from_secs(30), || {
            let (platform, base) = (platform.clone(), base.clone());
            async move {
                let events: Vec<serde_json::Value> = platform
                    .get(format!("{base}/exam/events"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let has = |t: &str| events.iter().any(|e| e["type"] == t);
                (has("session.started") && has("action.warn") && has("admin.mint_session"))
                    .then_some(events)
            }
        })
        .await;
    assert!(
        events.iter().all(|e| e["data"]["client_id"] == "c1"),
        "{events:?}"
    );
    // A request it cannot verify is refused.
    let res = platform
        .post(format!("{base}/webhooks/vigil"))
        .header("webhook-id", "forged")
        .header(
            "webhook-timestamp",
            (vigil::wire::now_ms() / 1000).to_string(),
        )
        .header("webhook-signature", "v1,AAAA")
        .body(r#"{"type":"action.allow","data":{"client_id":"c1"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    conn.close().await;
    let _ = node.kill().await;
    env.shutdown.cancel();
    writer.join().await.unwrap();
    let clients_dir = env.clients_dir.clone();
    env.teardown().await;
    let _ = std::fs::remove_dir_all(clients_dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// 10,000 wrong-token hellos for one client id, from 64 addresses at once, while 10 honest
/// clients connect: the id's own failure budget locks it out after a few, so the token threads
/// hash a handful of them, and every honest client is welcomed. The attacked id's permanent
/// token is refused while it is locked, and a session token still opens its session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_for_one_id_from_64_addresses_leave_honest_clients_in() {
    const HELLOS: usize = 10_000;
    const ADDRESSES: usize = 64;
    let mut env = TestEnv::new("loginflood");
    // The per-address throttle out of the way: the id's own budget alone must hold.
    env.cfg.edge.failed_hellos_per_minute = 1_000_000;
    let dir = env.clients_dir.with_extension("keys");
    env.cfg.sessions = keys(&dir, "session.key");
    let url = env.start_edge("e1").await;
    env.add_client("victim");
    let honest: Vec<String> = (0..10).map(|i| format!("honest-{i}")).collect();
    for id in &honest {
        env.add_client(id);
    }
    let started = std::time::Instant::now();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let attackers: Vec<_> = (0..ADDRESSES)
        .map(|a| {
            let (url, sent) = (url.clone(), sent.clone());
            let source = format!("127.0.1.{}", a + 1);
            tokio::spawn(async move {
                let mut answers = std::collections::BTreeMap::<String, usize>::new();
                for _ in 0..HELLOS / ADDRESSES + usize::from(a < HELLOS % ADDRESSES) {
                    let answer = crate::support::hello_from(
                        &source,
                        &url,
                        "victim",
                        "wrong-token-0123456789",
                        b"",
                    )
                    .await;
                    *answers.entry(answer).or_default() += 1;
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                answers
            })
        })
        .collect();
    // The honest clients come while the flood runs.
    while sent.load(std::sync::atomic::Ordering::Relaxed) < HELLOS / 10 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = sent.load(std::sync::atomic::Ordering::Relaxed);
    let clients: Vec<_> = honest
        .iter()
        .map(|id| {
            let (url, id) = (url.clone(), id.clone());
            tokio::spawn(async move {
                let t = std::time::Instant::now();
                hello(&url, &id, TOKEN)
                    .await
                    .unwrap_or_else(|e| panic!("{id} was refused during the flood: {e}"));
                t.elapsed()
            })
        })
        .collect();
    let mut welcomed = Vec::new();
    for c in clients {
        welcomed.push(c.await.unwrap());
    }
    let after = sent.load(std::sync::atomic::Ordering::Relaxed);
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    for a in attackers {
        for (answer, n) in a.await.unwrap() {
            *answers.entry(answer).or_default() += n;
        }
    }
    let took = started.elapsed();
    assert_eq!(answers.values().sum::<usize>(), HELLOS);
    // Every attempt was refused, and none was welcomed.
    assert!(
        answers.keys().all(|a| a.starts_with("error ")),
        "{answers:?}"
    );
    let registry = &env.edge_registries[0];
    let refused = |reason| {
        crate::support::metric(
            registry,
            "vigil_edge_sessions_refused_total",
            Some(("reason", reason)),
        )
    };
    assert!(refused("id_locked") > 0.0);
    // Tokens hashed for the attacked id: the budget (5) before the first lockout, then one per
    // lockout that runs out, each twice as long as the one before from 1 s: 20 more would
    // take the flood twelve days.
    assert!(
        refused("unauthorized") <= 25.0,
        "{}",
        refused("unauthorized")
    );
    assert_eq!(refused("hello_throttled"), 0.0);
    // The victim's own token waits out the lockout; a session token gets in now.
    let locked = hello(&url, "victim", TOKEN).await.unwrap_err();
    assert!(locked.starts_with("too_fast"), "{locked}");
    let record = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    let record = vigil::directory::ClientStore::get(&record, "victim")
        .unwrap()
        .unwrap();
    let minter = Minter::load(&env.cfg.sessions, &env.cfg.namespace)
        .unwrap()
        .unwrap();
    let (session, _) = minter
        .mint(
            "victim",
            &record.session_binding(),
            600,
            vigil::wire::now_ms(),
        )
        .unwrap();
    hello(&url, "victim", &session).await.unwrap();
    welcomed.sort();
    println!(
        "{HELLOS} wrong-token hellos for one id from {ADDRESSES} addresses in {:.1} s; answers \
         {answers:?}; tokens hashed for them (unauthorized) {}, refused as locked {}, refused \
         as throttled addresses {}; 10 honest clients welcomed at once while the flood went from {before} to {after}, \
         slowest hello {:?}, median {:?}",
        took.as_secs_f64(),
        refused("unauthorized"),
        refused("id_locked"),
        refused("hello_throttled"),
        welcomed[9],
        welcomed[5],
    );
    env.teardown().await;
}
