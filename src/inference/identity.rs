//! The `identity` analyzer: one face, the enrolled person, alive, and no phone in view.

use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use image::RgbImage;

use super::models::{CocoSsd, Face, Liveness, SFace, YuNet, cosine};
use super::{InferenceError, imageops, runtime};
use crate::config::{InferenceConfig, Thresholds};
use crate::wire::{FaceBox, IdentityAnalysis, IdentityScore, LivenessScore, PhoneBox, Verdict};

/// One set of sessions; `Session::run` needs `&mut`, so each analysis thread takes a set.
struct ModelSet {
    yunet: YuNet,
    sface: SFace,
    liveness: Liveness,
    coco: CocoSsd,
}

/// Seconds spent in each stage of one analysis.
pub type Stages = Vec<(&'static str, f64)>;

/// The model stack with a pool of session sets.
pub struct IdentityStack {
    sets: Mutex<Vec<ModelSet>>,
    returned: Condvar,
    thresholds: Thresholds,
    max_side: u32,
    /// `name:version` of each model, in the order they run.
    pub models: Vec<String>,
}

/// Why enrolment refused a reference photo.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("the reference photo shows no face")]
    NoFace,
    #[error("the reference photo shows {0} faces; it must show exactly one")]
    MultipleFaces(usize),
    #[error(transparent)]
    Inference(#[from] InferenceError),
}

impl IdentityStack {
    /// Load `sets` copies of the four models from `cfg.models_dir`.
    pub fn load(cfg: &InferenceConfig, sets: usize) -> Result<Self, InferenceError> {
        let manifest = crate::models::Manifest::embedded()
            .map_err(|e| InferenceError::Runtime(e.to_string()))?;
        let lib = runtime::locate(cfg.ort_dylib.as_deref())?;
        let env = runtime::environment(&lib)?;
        let path = |role: &str| cfg.models_dir.join(&manifest.by_role(role).file);
        for role in [
            "face_detection",
            "face_recognition",
            "liveness",
            "phone_detection",
        ] {
            let p = path(role);
            if !p.is_file() {
                return Err(InferenceError::Runtime(format!(
                    "model file {} is missing; run `vigil models fetch`",
                    p.display()
                )));
            }
        }
        let (t, d) = (cfg.intra_threads, cfg.device);
        let mut pool = Vec::new();
        for _ in 0..sets.max(1) {
            pool.push(ModelSet {
                yunet: YuNet::load(env, &path("face_detection"), t, d)?,
                sface: SFace::load(env, &path("face_recognition"), t, d)?,
                liveness: Liveness::load(env, &path("liveness"), t, d)?,
                coco: CocoSsd::load(env, &path("phone_detection"), t, d)?,
            });
        }
        let models = [
            "face_detection",
            "face_recognition",
            "liveness",
            "phone_detection",
        ]
        .iter()
        .map(|r| manifest.by_role(r).tag())
        .collect();
        Ok(Self {
            sets: Mutex::new(pool),
            returned: Condvar::new(),
            thresholds: cfg.thresholds.clone(),
            max_side: cfg.max_side,
            models,
        })
    }

    /// Run `f` with a free set of sessions (waiting for one if all are busy).
    fn with_set<T>(&self, f: impl FnOnce(&mut ModelSet) -> T) -> T {
        let mut set = {
            let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(s) = sets.pop() {
                    break s;
                }
                sets = self.returned.wait(sets).unwrap_or_else(|e| e.into_inner());
            }
        };
        let out = f(&mut set);
        self.sets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(set);
        self.returned.notify_one();
        out
    }

    /// Decode a frame and scale a copy to fit the detectors. Returns the original, the scaled
    /// copy, and the factor from original to scaled coordinates.
    fn prepare(&self, jpeg: &[u8]) -> Result<(RgbImage, RgbImage, f32), InferenceError> {
        let img = imageops::decode_jpeg(jpeg)?;
        let (small, scale) = imageops::fit_within(&img, self.max_side.min(YuNet::INPUT));
        Ok((img, small, scale))
    }

    /// Faces found on the scaled copy, in original coordinates.
    fn faces(
        &self,
        set: &mut ModelSet,
        small: &RgbImage,
        scale: f32,
    ) -> Result<Vec<Face>, InferenceError> {
        let t = &self.thresholds;
        let faces = set.yunet.detect(small, t.face_score, t.face_nms_iou)?;
        let k = 1.0 / scale;
        Ok(faces
            .into_iter()
            .map(|f| Face {
                x: f.x * k,
                y: f.y * k,
                w: f.w * k,
                h: f.h * k,
                score: f.score,
                landmarks: f.landmarks.map(|(x, y)| (x * k, y * k)),
            })
            .collect())
    }

    /// Analyse one frame against `reference` (an L2-normalised embedding, if enrolled).
    pub fn analyze(
        &self,
        jpeg: &[u8],
        reference: Option<&[f32]>,
    ) -> Result<(IdentityAnalysis, Stages), InferenceError> {
        let t = &self.thresholds;
        let mut stages = Stages::new();
        let mut clock = Instant::now();
        let mut lap = |name: &'static str, stages: &mut Stages| {
            stages.push((name, clock.elapsed().as_secs_f64()));
            clock = Instant::now();
        };
        let (img, small, scale) = self.prepare(jpeg)?;
        lap("preprocess", &mut stages);
        self.with_set(|set| {
            // Detection runs on the scaled copy; liveness and alignment on the original pixels,
            // as the models were made for.
            let faces = self.faces(set, &small, scale)?;
            lap("yunet", &mut stages);
            // The largest face is the one to verify.
            let main = faces
                .iter()
                .max_by(|a, b| (a.w * a.h).total_cmp(&(b.w * b.h)));
            let liveness = match main {
                Some(face) => {
                    let p_live = set.liveness.p_live(&img, face)?;
                    lap("fr_liveness", &mut stages);
                    Some(LivenessScore {
                        p_live,
                        live: p_live >= t.live_min,
                    })
                }
                None => None,
            };
            let identity = match (main, reference) {
                (Some(face), Some(reference)) => {
                    let embedding = set.sface.embed(&img, face)?;
                    lap("sface", &mut stages);
                    let similarity = cosine(&embedding, reference);
                    Some(IdentityScore {
                        similarity,
                        matched: similarity >= t.match_cosine,
                    })
                }
                _ => None,
            };
            let phones = set.coco.phones(&small, t.phone_score, t.phone_nms_iou)?;
            lap("cocossd", &mut stages);
            let unscale = 1.0 / scale;
            let phone = phones.first().map(|p| PhoneBox {
                score: p.score,
                x: p.x * unscale,
                y: p.y * unscale,
                w: p.w * unscale,
                h: p.h * unscale,
            });
            let verdict = verdict(
                faces.len(),
                liveness.as_ref(),
                identity.as_ref(),
                phone.as_ref(),
            );
            let faces = faces
                .iter()
                .map(|f| FaceBox {
                    x: f.x,
                    y: f.y,
                    w: f.w,
                    h: f.h,
                    score: f.score,
                })
                .collect();
            Ok((
                IdentityAnalysis {
                    verdict,
                    faces,
                    identity,
                    liveness,
                    phone,
                    models: self.models.clone(),
                    thresholds: [
                        ("face_score", t.face_score),
                        ("match_cosine", t.match_cosine),
                        ("live_min", t.live_min),
                        ("phone_score", t.phone_score),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
                },
                stages,
            ))
        })
    }

    /// The reference embedding of a photo that shows exactly one face.
    pub fn enroll(&self, jpeg: &[u8]) -> Result<Vec<f32>, EnrollError> {
        let (img, small, scale) = self.prepare(jpeg)?;
        self.with_set(|set| {
            let faces = self.faces(set, &small, scale)?;
            match faces.len() {
                0 => Err(EnrollError::NoFace),
                1 => Ok(set.sface.embed(&img, &faces[0])?),
                n => Err(EnrollError::MultipleFaces(n)),
            }
        })
    }

    /// The recognition model's tag, recorded with each reference.
    pub fn recognition_model(&self) -> &str {
        &self.models[1]
    }
}

/// The first rule that applies: no face, several faces, a spoof, the wrong person (or nobody
/// enrolled to compare with), a phone, otherwise ok.
pub fn verdict(
    faces: usize,
    liveness: Option<&LivenessScore>,
    identity: Option<&IdentityScore>,
    phone: Option<&PhoneBox>,
) -> Verdict {
    if faces == 0 {
        Verdict::NoFace
    } else if faces > 1 {
        Verdict::MultipleFaces
    } else if liveness.is_some_and(|l| !l.live) {
        Verdict::Spoof
    } else if !identity.is_some_and(|i| i.matched) {
        Verdict::WrongPerson
    } else if phone.is_some() {
        Verdict::Phone
    } else {
        Verdict::Ok
    }
}

/// Load a stack for the CLI and tests: one set of sessions.
pub fn load_single(cfg: &InferenceConfig) -> Result<IdentityStack, InferenceError> {
    IdentityStack::load(cfg, 1)
}

/// Read a JPEG file.
pub fn read_jpeg(path: &Path) -> Result<Vec<u8>, InferenceError> {
    std::fs::read(path).map_err(|e| InferenceError::BadImage(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_takes_the_first_rule_that_applies() {
        let live = LivenessScore {
            p_live: 0.9,
            live: true,
        };
        let dead = LivenessScore {
            p_live: 0.1,
            live: false,
        };
        let me = IdentityScore {
            similarity: 0.8,
            matched: true,
        };
        let other = IdentityScore {
            similarity: 0.1,
            matched: false,
        };
        let phone = PhoneBox {
            score: 0.9,
            x: 0.0,
            y: 0.0,
            w: 1.0,
            h: 1.0,
        };
        assert_eq!(verdict(0, None, None, Some(&phone)), Verdict::NoFace);
        assert_eq!(
            verdict(2, Some(&dead), Some(&other), None),
            Verdict::MultipleFaces
        );
        assert_eq!(
            verdict(1, Some(&dead), Some(&other), Some(&phone)),
            Verdict::Spoof
        );
        assert_eq!(
            verdict(1, Some(&live), Some(&other), Some(&phone)),
            Verdict::WrongPerson
        );
        assert_eq!(verdict(1, Some(&live), None, None), Verdict::WrongPerson);
        assert_eq!(
            verdict(1, Some(&live), Some(&me), Some(&phone)),
            Verdict::Phone
        );
        assert_eq!(verdict(1, Some(&live), Some(&me), None), Verdict::Ok);
    }
}
