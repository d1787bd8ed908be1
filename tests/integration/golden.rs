//! Golden files pin the wire format: schema 1 events must keep decoding, and this build must
//! keep writing exactly the schema-2 bytes. Regenerate only on a deliberate schema change with
//! VIGIL_BLESS=1 (and bump the schema version, unless the change only swaps an optional field
//! that both sides ignore when absent: then keep the old writer's file beside it, as
//! `identity.v2-signature.msgpack`, and test that it still decodes); the schema-1 files are
//! never rewritten.

use std::path::PathBuf;

use uuid::Uuid;
use vigil::wire::{
    Analysis, DropReason, Dropped, Envelope, FaceBox, FaceQuality, Frame, FrameResult,
    IdentityAnalysis, IdentityScore, LivenessScore, Payload, SCHEMA, TemporalScore, Verdict,
};

fn envelope(payload: Payload) -> Envelope {
    Envelope {
        schema: 1,
        id: Uuid::from_u128(0x0193_4d2a_7c00_7000_8000_0000_0000_002a),
        source: "edge-1".into(),
        seq: 42,
        client_id: "candidate-7".into(),
        produced_at_ms: 1_763_777_000_000,
        deadline_ms: 1_763_777_003_000,
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        payload,
    }
}

fn cases() -> Vec<(&'static str, Envelope)> {
    let frame_id = Uuid::from_u128(0x0193_4d2a_7c00_7000_8000_0000_0000_0001);
    vec![
        (
            "frame.v1.msgpack",
            envelope(Payload::Frame(Frame {
                session: 0x1234_5678_9abc_def0,
                seq: 7,
                captured_at_ms: Some(1_763_776_999_990),
                jpeg: vec![0xFF, 0xD8, 0xFF, 0xD9].into(),
                reference: None,
                phone_check: true,
                track: None,
            })),
        ),
        (
            "result.v1.msgpack",
            envelope(Payload::Result(FrameResult {
                session: 0x1234_5678_9abc_def0,
                seq: 7,
                frame_id,
                analyzer: "frame-info".into(),
                analyze_us: 12,
                analysis: Analysis::FrameInfo {
                    width: 640,
                    height: 480,
                    components: 3,
                },
            })),
        ),
        (
            "dropped.v1.msgpack",
            envelope(Payload::Dropped(Dropped {
                session: 0x1234_5678_9abc_def0,
                seq: 7,
                frame_id,
                reason: DropReason::Expired,
                detail: "deadline passed in the queue".into(),
            })),
        ),
    ]
}

/// Schema 2: the same events as this build writes them, and an identity result with every
/// field schema 2 added.
fn cases_v2() -> Vec<(String, Envelope)> {
    let mut out: Vec<(String, Envelope)> = cases()
        .into_iter()
        .map(|(file, mut env)| {
            env.schema = SCHEMA;
            (file.replace(".v1.", ".v2."), env)
        })
        .collect();
    let mut env = envelope(Payload::Result(FrameResult {
        session: 0x1234_5678_9abc_def0,
        seq: 8,
        frame_id: Uuid::from_u128(0x0193_4d2a_7c00_7000_8000_0000_0000_0002),
        analyzer: "identity".into(),
        analyze_us: 51_000,
        analysis: Analysis::Identity(IdentityAnalysis {
            verdict: Verdict::LowQuality,
            faces: vec![FaceBox {
                x: 10.0,
                y: 20.0,
                w: 30.0,
                h: 40.0,
                score: 0.9,
            }],
            identity: Some(IdentityScore {
                similarity: 0.5,
                matched: true,
            }),
            liveness: Some(LivenessScore {
                p_live: 0.25,
                pad: None,
                live: true,
                temporal: Some(TemporalScore {
                    faces: 9,
                    jitter: 0.03,
                    drift: 0.12,
                    p_live_median: 0.07,
                    pad_median: None,
                    spoof: None,
                }),
            }),
            phone: None,
            models: vec!["yunet:2023mar".into()],
            skipped: Vec::new(),
            carried: Vec::new(),
            thresholds: [("match_cosine".to_owned(), 0.41)].into_iter().collect(),
            quality: Some(FaceQuality {
                face_px: 30.0,
                sharpness: 120.0,
                brightness: 110.0,
                yaw: 0.05,
                pitch: 0.5,
                failed: Some("too_small".into()),
            }),
            appearance: Some(vec![1u8, 255, 127, 129].into()),
            track: None,
        }),
    }));
    env.schema = SCHEMA;
    out.push(("identity.v2.msgpack".into(), env));
    out
}

#[test]
fn schema_2_golden_files_are_what_this_build_writes() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("VIGIL_BLESS").is_some();
    for (file, expected) in cases_v2() {
        let path = dir.join(&file);
        let encoded = expected.encode().unwrap();
        if bless {
            std::fs::write(&path, &encoded).unwrap();
        }
        let golden = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with VIGIL_BLESS=1 once)", path.display()));
        assert_eq!(Envelope::decode(&golden).unwrap(), expected, "{file}");
        assert_eq!(encoded, golden, "{file}: this build writes different bytes");
    }
}

#[test]
fn schema_1_golden_files_still_decode() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    for (file, expected) in cases() {
        let golden = std::fs::read(dir.join(file)).unwrap();
        assert_eq!(
            Envelope::decode(&golden).unwrap(),
            expected,
            "{file} no longer decodes the same"
        );
        // A schema-1 writer's bytes are still exactly what schema 1 was.
        assert_eq!(expected.encode().unwrap(), golden, "{file}");
    }
}

/// Workers before the `appearance` field sent the recognition embedding as `signature`: such a
/// result still decodes, its `signature` ignored (the still test gets nothing from it).
#[test]
fn an_identity_result_with_the_old_signature_field_still_decodes() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let golden = std::fs::read(dir.join("identity.v2-signature.msgpack")).unwrap();
    let (_, mut expected) = cases_v2()
        .into_iter()
        .find(|(f, _)| f == "identity.v2.msgpack")
        .unwrap();
    if let Payload::Result(r) = &mut expected.payload
        && let Analysis::Identity(a) = &mut r.analysis
    {
        a.appearance = None;
    }
    assert_eq!(Envelope::decode(&golden).unwrap(), expected);
}
