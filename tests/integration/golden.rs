//! Golden files pin the wire format: schema 1 events must keep decoding, and this build must
//! keep writing exactly these bytes. Regenerate only on a deliberate schema change with
//! VIGIL_BLESS=1 (and bump the schema version).

use std::path::PathBuf;

use uuid::Uuid;
use vigil::wire::{Analysis, DropReason, Dropped, Envelope, Frame, FrameResult, Payload, SCHEMA};

fn envelope(payload: Payload) -> Envelope {
    Envelope {
        schema: SCHEMA,
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

#[test]
fn schema_1_golden_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("VIGIL_BLESS").is_some();
    for (file, expected) in cases() {
        let path = dir.join(file);
        let encoded = expected.encode().unwrap();
        if bless {
            std::fs::write(&path, &encoded).unwrap();
        }
        let golden = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with VIGIL_BLESS=1 once)", path.display()));
        assert_eq!(
            Envelope::decode(&golden).unwrap(),
            expected,
            "{file} no longer decodes the same"
        );
        assert_eq!(encoded, golden, "{file}: this build writes different bytes");
    }
}
