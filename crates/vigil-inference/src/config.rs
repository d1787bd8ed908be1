//! The model stack's settings: where the models and ONNX Runtime are, how they run, and every
//! decision threshold. Read from `[inference]` and the `VIGIL_*` variables by `vigil`'s
//! configuration, which re-exports them at `config::{InferenceConfig, Thresholds}`.

use std::path::PathBuf;

use serde::Deserialize;

/// The model stack: where models and ONNX Runtime are, how they run, and every threshold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Folder holding the model files of `models/models.toml` [VIGIL_MODELS_DIR].
    pub models_dir: PathBuf,
    /// Path of `libonnxruntime.so.1.31.1`; searched in `.cache/onnxruntime/` and
    /// `/opt/vigil/lib/` when unset [VIGIL_ORT_DYLIB].
    pub ort_dylib: Option<PathBuf>,
    /// `cpu`, or `cuda` (needs the `cuda` feature and onnxruntime-gpu; falls back to CPU with a
    /// warning) [VIGIL_DEVICE].
    pub device: vigil_core::domain::Device,
    /// ONNX Runtime intra-op threads per model run. With `worker.analysis_threads`, keep
    /// `analysis_threads x intra_threads` at or below the cores [VIGIL_INTRA_THREADS].
    pub intra_threads: usize,
    /// Frames are scaled to fit this many pixels on each side before the models run
    /// [VIGIL_MAX_SIDE].
    pub max_side: u32,
    /// Most pixels an image may declare; larger ones are refused before decoding, and the
    /// decoder runs with this limit [VIGIL_MAX_PIXELS].
    pub max_pixels: u64,
    /// Most scans a JPEG may hold: a progressive file can make the decoder pass over the whole
    /// image once per scan, so the worker refuses more before decoding [VIGIL_MAX_JPEG_SCANS].
    pub max_jpeg_scans: u32,
    pub thresholds: Thresholds,
}

/// Every decision threshold of the identity analyzer. The defaults are the ones recorded in
/// `models/models.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    /// Minimum YuNet face score [VIGIL_FACE_SCORE].
    pub face_score: f32,
    /// NMS IoU for faces.
    pub face_nms_iou: f32,
    /// Cosine similarity at or above which a face is the enrolled person (OpenCV's SFace
    /// threshold) [VIGIL_MATCH_COSINE].
    pub match_cosine: f32,
    /// Single-frame P(live) below which a frame alone is a spoof [VIGIL_LIVE_MIN]. Off (0) by
    /// default: on webcam video the model scores honest faces as low as printed photos (see
    /// `models/models.toml`), so liveness is decided over the stream (`[liveness]`).
    pub live_min: f32,
    /// Minimum COCO-SSD "cell phone" score [VIGIL_PHONE_SCORE].
    pub phone_score: f32,
    /// NMS IoU for phones.
    pub phone_nms_iou: f32,
    /// Quality gate: the face box's shorter side must be at least this many pixels
    /// [VIGIL_FACE_MIN_PX].
    pub face_min_px: f32,
    /// Quality gate: least Laplacian variance of the aligned face [VIGIL_SHARPNESS_MIN].
    pub sharpness_min: f32,
    /// Quality gate: mean grey level of the aligned face, at least...
    pub brightness_min: f32,
    /// ...and at most.
    pub brightness_max: f32,
    /// Quality gate: largest horizontal turn, nose offset in eye distances.
    pub yaw_max: f32,
    /// A face too turned to judge fully is still the wrong person when its similarity to the
    /// reference is below this (a turned face of the enrolled person scores lower than a
    /// frontal one, someone else's far lower); see `docs/liveness.md`.
    pub turned_match_cosine: f32,
    /// Quality gate: the nose's place between eyes (0) and mouth (1), at least...
    pub pitch_min: f32,
    /// ...and at most.
    pub pitch_max: f32,
    /// Track reuse: a frame's one face is on the client's track when its box overlaps the
    /// track's by at least this IoU...
    pub track_iou_min: f32,
    /// ...and none of its landmarks moved further than this share of the face's width.
    pub track_shift_max: f32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            face_score: 0.6,
            face_nms_iou: 0.3,
            match_cosine: 0.41,
            live_min: 0.0,
            phone_score: 0.5,
            phone_nms_iou: 0.5,
            face_min_px: 32.0,
            sharpness_min: 4.0,
            brightness_min: 25.0,
            brightness_max: 240.0,
            yaw_max: 0.6,
            turned_match_cosine: 0.12,
            pitch_min: 0.2,
            pitch_max: 0.8,
            track_iou_min: 0.6,
            track_shift_max: 0.15,
        }
    }
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            models_dir: PathBuf::from("models"),
            ort_dylib: None,
            device: vigil_core::domain::Device::Cpu,
            intra_threads: 1,
            max_side: 640,
            max_pixels: 16 * 1024 * 1024,
            max_jpeg_scans: 64,
            thresholds: Thresholds::default(),
        }
    }
}
