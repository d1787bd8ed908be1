//! Bad input gets a clear error and the pipeline keeps serving.

use std::time::Duration;

use vigil::edge::client::{Connection, Incoming};
use vigil::inference::synthetic_jpeg;
use vigil::wire::DropReason;
use vigil::wire::client::{Encoding, ErrorCode, ServerMsg};

use crate::support::{TOKEN, TestEnv, eventually, metric};

async fn next_msg(conn: &mut Connection) -> Incoming {
    tokio::time::timeout(Duration::from_secs(10), conn.recv())
        .await
        .expect("an answer in time")
        .expect("socket open")
        .expect("well-formed message")
}

async fn expect_result(conn: &mut Connection, seq: u64, jpeg: &[u8]) {
    conn.send_frame(seq, 0, jpeg).await.unwrap();
    match next_msg(conn).await {
        Incoming::Msg(ServerMsg::Result { seq: got, .. }) => assert_eq!(got, seq),
        other => panic!("expected a result for seq {seq}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_refused_and_the_pipeline_keeps_serving() {
    let mut env = TestEnv::new("garbage");
    env.cfg.edge.max_frame_bytes = 50_000;
    env.cfg.edge.hello_timeout_ms = 400;
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    env.add_client("c1");
    let good = synthetic_jpeg(64, 48, 1, 0);

    let (mut conn, welcome) = Connection::connect(&url, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    assert!(matches!(
        welcome,
        ServerMsg::Welcome {
            max_frame_bytes: 50_000,
            ..
        }
    ));
    expect_result(&mut conn, 1, &good).await;

    // A frame that is not a JPEG.
    conn.send_frame(2, 0, b"GIF89a not a jpeg").await.unwrap();
    match next_msg(&mut conn).await {
        Incoming::Msg(ServerMsg::Dropped {
            seq: 2,
            reason: DropReason::NotJpeg,
            ..
        }) => {}
        other => panic!("expected not_jpeg, got {other:?}"),
    }
    // An oversize frame.
    conn.send_frame(3, 0, &synthetic_jpeg(64, 48, 1, 60_000))
        .await
        .unwrap();
    match next_msg(&mut conn).await {
        Incoming::Msg(ServerMsg::Dropped {
            seq: 3,
            reason: DropReason::FrameTooLarge,
            detail,
        }) => {
            assert!(detail.contains("50000"), "{detail}");
        }
        other => panic!("expected frame_too_large, got {other:?}"),
    }
    // Invalid JSON.
    conn.send_text("{\"type\":\"frame\",").await.unwrap();
    match next_msg(&mut conn).await {
        Incoming::Msg(ServerMsg::Error {
            code: ErrorCode::BadRequest,
            message,
        }) => {
            assert!(message.contains("invalid json"), "{message}");
        }
        other => panic!("expected bad_request, got {other:?}"),
    }
    // A JPEG header with broken markers never reaches a worker: the edge walks the markers.
    conn.send_frame(4, 0, &[0xFF, 0xD8, 0xFF, 0xE0, 0xFF, 0xFF])
        .await
        .unwrap();
    match next_msg(&mut conn).await {
        Incoming::Msg(ServerMsg::Dropped {
            seq: 4,
            reason: DropReason::NotJpeg,
            detail,
        }) => {
            assert!(detail.contains("runs past the end"), "{detail}");
        }
        other => panic!("expected not_jpeg from the edge, got {other:?}"),
    }
    // Seventeen bytes that declare a 23170x23170 image (1.6 GB once decoded to RGB): refused
    // by the edge from the header alone.
    let bomb: &[u8] = &[
        0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x0B, 0x08, 0x5A, 0x82, 0x5A, 0x82, 0x01, 0x01, 0x11, 0x00,
        0xFF, 0xD9,
    ];
    conn.send_frame(7, 0, bomb).await.unwrap();
    match next_msg(&mut conn).await {
        Incoming::Msg(ServerMsg::Dropped {
            seq: 7,
            reason: DropReason::FrameTooLarge,
            detail,
        }) => {
            assert!(detail.contains("23170x23170"), "{detail}");
        }
        other => panic!("expected frame_too_large for the bomb, got {other:?}"),
    }
    // Still serving.
    expect_result(&mut conn, 5, &good).await;

    // A wrong token.
    let mut intruder = Connection::open(&url, Encoding::Json).await.unwrap();
    intruder.send_hello("c1", "wrong-token-000").await.unwrap();
    assert!(matches!(
        next_msg(&mut intruder).await,
        Incoming::Msg(ServerMsg::Error {
            code: ErrorCode::Unauthorized,
            ..
        })
    ));
    assert!(matches!(
        next_msg(&mut intruder).await,
        Incoming::Closed { code: 4401, .. }
    ));

    // A client that never says hello.
    let mut silent = Connection::open(&url, Encoding::Json).await.unwrap();
    assert!(matches!(
        next_msg(&mut silent).await,
        Incoming::Msg(ServerMsg::Error {
            code: ErrorCode::HelloTimeout,
            ..
        })
    ));
    assert!(matches!(
        next_msg(&mut silent).await,
        Incoming::Closed { code: 4400, .. }
    ));

    // A frame before hello.
    let mut rude = Connection::open(&url, Encoding::MsgPack).await.unwrap();
    rude.send_frame(1, 0, &good).await.unwrap();
    assert!(matches!(
        next_msg(&mut rude).await,
        Incoming::Msg(ServerMsg::Error {
            code: ErrorCode::BadRequest,
            ..
        })
    ));

    // Bad MessagePack published straight to the frames exchange lands in the dead letters.
    let broker = env.broker().await;
    let dead = env.name("dead.letters");
    let publisher = broker.publisher().await.unwrap();
    for junk in [&b"\xc1\xc1 not msgpack"[..], b"\x93\x01\x02\x03", b""] {
        publisher
            .publish_raw(&env.name("frames"), "", junk)
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
    }
    // The same bomb published straight to the frames exchange, as a hostile publisher would,
    // bypassing the edge: the worker checks the declared size before decoding, refuses the
    // frame and dead-letters it (and stays up to serve the next frame).
    let forged = vigil::wire::Envelope {
        schema: vigil::wire::SCHEMA,
        id: uuid::Uuid::now_v7(),
        source: "forged-edge".into(),
        seq: 1,
        client_id: "c1".into(),
        produced_at_ms: vigil::wire::now_ms(),
        deadline_ms: vigil::wire::now_ms() + 30_000,
        traceparent: vigil::wire::new_traceparent(),
        payload: vigil::wire::Payload::Frame(vigil::wire::Frame {
            session: 1,
            seq: 1,
            captured_at_ms: None,
            jpeg: bomb.to_vec().into(),
            reference: None,
            phone_check: true,
            track: None,
        }),
    };
    publisher
        .publish_raw(&env.name("frames"), "", &forged.encode().unwrap())
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    // Three junk events plus the forged bomb.
    eventually("dead letters", Duration::from_secs(10), || {
        let broker = &broker;
        let dead = &dead;
        async move { (broker.queue_len(dead).await.ok()? >= 4).then_some(()) }
    })
    .await;
    let letter = broker.get(&dead).await.unwrap().expect("a dead letter");
    assert_eq!(letter.death_reason.as_deref(), Some("rejected"));
    let registry = &env.worker_registries[0];
    assert_eq!(
        metric(
            registry,
            "vigil_worker_dead_lettered_total",
            Some(("reason", "malformed"))
        ),
        3.0
    );
    assert_eq!(
        metric(
            registry,
            "vigil_worker_decode_errors_total",
            Some(("kind", "envelope"))
        ),
        3.0
    );

    // And the pipeline still serves.
    expect_result(&mut conn, 6, &good).await;
    let edge = &env.edge_registries[0];
    assert_eq!(
        metric(
            edge,
            "vigil_edge_frames_dropped_total",
            Some(("reason", "not_jpeg"))
        ),
        2.0
    );
    assert_eq!(
        metric(
            edge,
            "vigil_edge_frames_dropped_total",
            Some(("reason", "frame_too_large"))
        ),
        2.0
    );
    assert!(
        metric(
            edge,
            "vigil_edge_sessions_refused_total",
            Some(("reason", "unauthorized"))
        ) >= 1.0
    );
    broker.close().await;
    conn.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_bite_and_are_counted() {
    let mut env = TestEnv::new("limits");
    env.cfg.edge.max_sessions = 1;
    env.cfg.edge.max_fps = 5;
    env.cfg.edge.flood_factor = 1000;
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    env.add_client("c1");
    env.add_client("c2");
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();

    // Sessions per edge, counted from authentication: the second client is refused once it
    // has said hello.
    let mut second = Connection::open(&url, Encoding::Json).await.unwrap();
    second.send_hello("c2", TOKEN).await.unwrap();
    assert!(matches!(
        next_msg(&mut second).await,
        Incoming::Msg(ServerMsg::Error {
            code: ErrorCode::SystemFull,
            ..
        })
    ));
    assert!(matches!(
        next_msg(&mut second).await,
        Incoming::Closed { code: 4503, .. }
    ));

    // Frames per second: a burst of 20 admits the bucket's 5, the rest are rate limited.
    let jpeg = synthetic_jpeg(64, 48, 3, 0);
    for seq in 1..=20 {
        conn.send_frame(seq, 0, &jpeg).await.unwrap();
    }
    let mut limited = 0;
    let mut answered = 0;
    while answered < 20 {
        match next_msg(&mut conn).await {
            Incoming::Msg(ServerMsg::Dropped {
                reason: DropReason::RateLimited,
                ..
            }) => {
                limited += 1;
                answered += 1;
            }
            Incoming::Msg(ServerMsg::Dropped { .. } | ServerMsg::Result { .. }) => answered += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(limited >= 14, "only {limited} of 20 rate limited");
    let edge = &env.edge_registries[0];
    assert_eq!(
        metric(
            edge,
            "vigil_edge_frames_dropped_total",
            Some(("reason", "rate_limited"))
        ),
        limited as f64
    );
    assert_eq!(
        metric(
            edge,
            "vigil_edge_sessions_refused_total",
            Some(("reason", "full"))
        ),
        1.0
    );
    conn.close().await;
    env.teardown().await;
}

/// A WebSocket client by hand that completes the handshake and then only writes: it never
/// reads a byte of what the edge sends, as a hostile or wedged peer does.
async fn deaf_client(url: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = crate::support::ws_addr(url);
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "GET /v1/stream HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    // Read the 101 response, and nothing after it.
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.unwrap();
        response.push(byte[0]);
    }
    assert!(response.starts_with(b"HTTP/1.1 101"));
    tcp
}

/// A masked client frame (RFC 6455 5.3) with a payload under 126 bytes.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126, "short frames only");
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_cannot_hold_the_edge() {
    use tokio::io::AsyncWriteExt;
    let mut env = TestEnv::new("deaf");
    env.cfg.edge.max_sessions = 2;
    env.cfg.edge.hello_timeout_ms = 500;
    env.cfg.edge.write_timeout_ms = 300;
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    env.add_client("c1");
    // Two connections take both slots, flood pings (each asks for a pong back), never say
    // hello and never read.
    let ping = client_frame(0x9, &[b'p'; 125]);
    let burst: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 2000)
        .collect();
    let mut deaf = Vec::new();
    for _ in 0..2 {
        let mut tcp = deaf_client(&url).await;
        for _ in 0..30 {
            // The edge may stop reading them too; a bounded write keeps the test moving.
            if tokio::time::timeout(Duration::from_millis(200), tcp.write_all(&burst))
                .await
                .is_err()
            {
                break;
            }
        }
        deaf.push(tcp);
    }
    // They hold no session slot (slots are taken after authentication): an honest client is
    // welcomed while they are still there.
    let registry = &env.edge_registries[0];
    eventually("an honest client welcomed", Duration::from_secs(15), || {
        let url = url.clone();
        async move {
            let connect = Connection::connect(&url, "c1", TOKEN, Encoding::Json);
            let (_, welcome) = tokio::time::timeout(Duration::from_secs(2), connect)
                .await
                .ok()?
                .ok()?;
            Some(welcome)
        }
    })
    .await;
    // And each is closed within the hello timeout plus the write deadlines, however full its
    // socket: nothing waits on a peer that does not read.
    eventually(
        "the deaf sockets closed",
        Duration::from_secs(15),
        || async {
            (metric(
                registry,
                "vigil_edge_sessions_refused_total",
                Some(("reason", "hello_timeout")),
            ) >= 2.0)
                .then_some(())
        },
    )
    .await;
    drop(deaf);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_client_that_stops_reading_is_closed_as_a_slow_reader() {
    let mut env = TestEnv::new("slowreader");
    env.cfg.edge.max_sessions = 1;
    env.cfg.edge.write_timeout_ms = 300;
    env.cfg.edge.max_fps = 1000;
    env.cfg.edge.flood_factor = 1000;
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    env.add_client("c1");
    // Vigil's own client, authenticated, that sends frames and never reads an answer.
    let (mut conn, _) = Connection::connect(&url, "c1", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    let jpeg = synthetic_jpeg(64, 48, 9, 0);
    let registry = &env.edge_registries[0];
    let started = std::time::Instant::now();
    let mut seq = 0;
    while metric(registry, "vigil_edge_slow_readers_total", None) < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the edge never gave up on a client that does not read"
        );
        seq += 1;
        // Once the edge stops reading too, this write waits: bound it and look again.
        let _ =
            tokio::time::timeout(Duration::from_millis(100), conn.send_frame(seq, 0, &jpeg)).await;
    }
    // Its slot is free: the same client connects again and is welcomed.
    eventually("the client welcomed again", Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            let connect = Connection::connect(&url, "c1", TOKEN, Encoding::Json);
            tokio::time::timeout(Duration::from_secs(2), connect)
                .await
                .ok()?
                .ok()
                .map(|(_, w)| w)
        }
    })
    .await;
    drop(conn);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_hellos_are_throttled_per_address() {
    let mut env = TestEnv::new("hellothrottle");
    env.cfg.edge.failed_hellos_per_minute = 2;
    let url = env.start_edge("e1").await;
    env.add_client("c1");
    // Two wrong tokens are answered as such; the third uses up the address's quota.
    for _ in 0..3 {
        let refused = Connection::connect(&url, "c1", "wrong-token-000", Encoding::Json)
            .await
            .map(|(_, welcome)| welcome);
        assert!(
            matches!(&refused, Err(vigil::edge::client::ClientError::Refused { code, .. }) if code == "unauthorized"),
            "{refused:?}"
        );
    }
    // Now even the right token is refused from this address, before it is checked.
    let throttled = Connection::connect(&url, "c1", TOKEN, Encoding::Json)
        .await
        .map(|(_, welcome)| welcome);
    assert!(
        matches!(&throttled, Err(vigil::edge::client::ClientError::Refused { code, message })
            if code == "too_fast" && message.contains("failed hellos")),
        "{throttled:?}"
    );
    let registry = &env.edge_registries[0];
    assert_eq!(
        metric(
            registry,
            "vigil_edge_sessions_refused_total",
            Some(("reason", "hello_throttled"))
        ),
        1.0
    );
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_pings_and_closes_a_client_that_goes_silent() {
    let mut env = TestEnv::new("idle");
    env.cfg.edge.ping_interval_ms = 200;
    env.cfg.edge.idle_timeout_ms = 800;
    let url = env.start_edge("e1").await;
    env.add_client("c1");
    env.add_client("c2");
    // A client that reads answers the pings (WebSocket clients do so by themselves) and stays.
    let (mut alive, _) = Connection::connect(&url, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    // A client that goes silent: it neither sends nor reads, so it answers no ping.
    let (mut silent, _) = Connection::connect(&url, "c2", TOKEN, Encoding::Json)
        .await
        .unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        match tokio::time::timeout_at(until, alive.recv()).await {
            Err(_) => break,
            Ok(Some(Ok(Incoming::Closed { code, reason }))) => {
                panic!("a client that answers pings was closed {code} {reason}")
            }
            Ok(other) => assert!(matches!(other, Some(Ok(_))), "{other:?}"),
        }
    }
    // The silent one's session was closed `idle`, and counted; the other is still open.
    let registry = &env.edge_registries[0];
    assert_eq!(metric(registry, "vigil_edge_idle_closed_total", None), 1.0);
    assert_eq!(metric(registry, "vigil_edge_sessions_active", None), 1.0);
    // Reading now, it finds the close (4410), unless its own replies to the queued pings hit
    // the already closed socket first.
    loop {
        match tokio::time::timeout(Duration::from_secs(5), silent.recv()).await {
            Ok(Some(Ok(Incoming::Closed { code, .. }))) => {
                assert_eq!(code, 4410);
                break;
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => break,
            Err(_) => panic!("the silent client's socket is still open"),
        }
    }
    env.teardown().await;
}

/// Before the hello, a client gets little: a message larger than a hello is refused, and so is
/// a client id that is not one (it would reach file names and log lines); both count against
/// the address like a failed hello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_pre_hello_messages_and_bad_ids_are_refused() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let mut env = TestEnv::new("prehello");
    env.cfg.edge.max_hello_bytes = 4096;
    let url = env.start_edge("e1").await;
    env.add_client("c1");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(Message::Text("x".repeat(5000).into()))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => {
            assert!(
                t.contains("bad_request") && t.contains("at most 4096 bytes"),
                "{t}"
            );
        }
        other => panic!("no refusal: {other:?}"),
    }
    for bad in ["c1\nFAKE LOG LINE", &"c".repeat(65), "../c1", ""] {
        let refused = Connection::connect(&url, bad, TOKEN, Encoding::Json)
            .await
            .map(|(_, welcome)| welcome);
        assert!(
            matches!(&refused, Err(vigil::edge::client::ClientError::Refused { code, message })
                if code == "bad_request" && message.contains("client_id")),
            "{bad:?}: {refused:?}"
        );
    }
    let registry = &env.edge_registries[0];
    assert_eq!(
        metric(
            registry,
            "vigil_edge_sessions_refused_total",
            Some(("reason", "hello_too_large"))
        ),
        1.0
    );
    // The right client still gets in.
    Connection::connect(&url, "c1", TOKEN, Encoding::Json)
        .await
        .unwrap();
    env.teardown().await;
}
