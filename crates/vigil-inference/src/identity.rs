//! The `identity` analyzer: one face, the enrolled person, alive, and no phone in view.

use std::sync::{Condvar, Mutex};
use std::time::Instant;

use image::RgbImage;

use super::manifest::{PAD_ROLE, REQUIRED_ROLES};
use super::models::{CocoSsd, Face, Liveness, Pad, SFace, YuNet, cosine};
use super::{InferenceError, imageops, quality, runtime};
use crate::config::{InferenceConfig, Thresholds};
use vigil_core::wire::{
    FaceBox, FaceQuality, IdentityAnalysis, IdentityScore, LivenessScore, PhoneBox, Track, Verdict,
};

/// One set of sessions; `Session::run` needs `&mut`, so each analysis thread takes a set.
struct ModelSet {
    yunet: YuNet,
    sface: SFace,
    liveness: Liveness,
    coco: CocoSsd,
    /// The presentation-attack model, when its file is there (it is optional).
    pad: Option<Pad>,
}

/// Seconds spent in each stage of one analysis.
pub type Stages = Vec<(&'static str, f64)>;

/// The model stack with a pool of session sets.
pub struct IdentityStack {
    sets: Mutex<Vec<ModelSet>>,
    returned: Condvar,
    thresholds: Thresholds,
    max_side: u32,
    max_pixels: u64,
    has_pad: bool,
    /// `name:version` of each model, in the order they run.
    pub models: Vec<String>,
    /// `name:version` of the phone detector, which a frame may skip ([`vigil_core::cadence`]).
    phone_model: String,
    /// `name:version` of the models a frame on the client's track skips: the recogniser and
    /// the liveness models ([`vigil_core::cadence::IdentityCadence`]).
    carried_models: Vec<String>,
}

fn face_box(f: &Face) -> FaceBox {
    FaceBox {
        x: f.x,
        y: f.y,
        w: f.w,
        h: f.h,
        score: f.score,
    }
}

fn track_of(f: &Face) -> Track {
    Track {
        x: f.x,
        y: f.y,
        w: f.w,
        h: f.h,
        landmarks: f.landmarks.map(|(x, y)| [x, y]),
    }
}

/// Whether `face` is where `track` left the client's face: boxes overlapping by at least
/// `track_iou_min`, and no landmark moved further than `track_shift_max` of the face's width.
fn on_track(face: &Face, track: &Track, t: &Thresholds) -> bool {
    let iou = super::models::iou(
        (face.x, face.y, face.w, face.h),
        (track.x, track.y, track.w, track.h),
    );
    let shift = face
        .landmarks
        .iter()
        .zip(&track.landmarks)
        .map(|((x, y), [tx, ty])| ((x - tx).powi(2) + (y - ty).powi(2)).sqrt())
        .fold(0f32, f32::max);
    iou >= t.track_iou_min && shift <= t.track_shift_max * face.w.max(1.0)
}

/// Why enrolment refused a reference photo.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("the reference photo shows no face")]
    NoFace,
    #[error("the reference photo shows {0} faces; it must show exactly one")]
    MultipleFaces(usize),
    #[error("the reference photo's face is too poor to enrol: {0}")]
    LowQuality(&'static str),
    #[error(
        "reference photo {index} does not match the others (similarity {similarity:.3}, \
         below {threshold}): are they all of one person?"
    )]
    Outlier {
        index: usize,
        similarity: f32,
        threshold: f32,
    },
    #[error("no reference photo given")]
    Empty,
    #[error("reference photo {index}: {source}")]
    Photo {
        index: usize,
        #[source]
        source: Box<EnrollError>,
    },
    #[error(transparent)]
    Inference(#[from] InferenceError),
}

/// A template made from one or more reference photos.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// The normalised mean of the photos' embeddings.
    pub embedding: Vec<f32>,
    /// Each photo's similarity to the template.
    pub similarities: Vec<f32>,
    /// The enrolled person's own genuine margin: the lowest photo similarity to the template
    /// minus the match threshold. A small margin means live frames may fall below it.
    pub margin: f32,
}

/// A model set lent out of the pool; it goes back when dropped.
struct Lent<'a> {
    stack: &'a IdentityStack,
    set: Option<ModelSet>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(set) = self.set.take() {
            self.stack
                .sets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(set);
            self.stack.returned.notify_one();
        }
    }
}

/// A frame as [`IdentityStack::analyze_batch`] takes it.
pub struct BatchFrame<'a> {
    pub jpeg: &'a [u8],
    /// The client's enrolled reference embedding, when it has one.
    pub reference: Option<&'a [f32]>,
    /// Whether the phone detector must run ([`vigil_core::cadence`]).
    pub phone_check: bool,
    /// The face track the frame may carry its identity over to.
    pub track: Option<&'a Track>,
}

/// A decoded frame and its scaled copy.
struct Prepared {
    img: RgbImage,
    small: RgbImage,
    scale: f32,
    stages: Stages,
}

/// What detection left to do for a frame.
enum Detected {
    /// Done: carried over on its track.
    Carried(Box<(IdentityAnalysis, Stages)>),
    /// Every model runs.
    Full(Box<Full>),
}

/// A frame that every model runs on, between the batched runs.
struct Full {
    /// Its place in the batch.
    at: usize,
    img: RgbImage,
    small: RgbImage,
    scale: f32,
    faces: Vec<Face>,
    /// The largest face, the one to verify.
    main: Option<usize>,
    main_track: Option<Track>,
    /// The main face aligned for the recogniser, and its quality.
    aligned: Option<(RgbImage, FaceQuality)>,
    /// Seconds spent aligning it.
    align_s: f64,
    embedding: Option<Vec<f32>>,
    p_live: Option<f32>,
    stages: Stages,
}

/// One face, measured for judging.
struct Judged {
    quality: FaceQuality,
    embedding: Vec<f32>,
}

impl IdentityStack {
    /// Load `sets` copies of the models from `cfg.models_dir`: the four required ones, and the
    /// presentation-attack model when its file is there.
    pub fn load(cfg: &InferenceConfig, sets: usize) -> Result<Self, InferenceError> {
        Self::load_with(cfg, sets, 1)
    }

    /// [`IdentityStack::load`] for [`IdentityStack::analyze_batch`] on up to `batch_max`
    /// frames: above 1, the recogniser's and fr_liveness's batch axes are freed.
    pub fn load_with(
        cfg: &InferenceConfig,
        sets: usize,
        batch_max: usize,
    ) -> Result<Self, InferenceError> {
        let batch = batch_max > 1;
        let manifest = crate::manifest::Manifest::embedded()
            .map_err(|e| InferenceError::Runtime(e.to_string()))?;
        let lib = runtime::locate(cfg.ort_dylib.as_deref())?;
        let env = runtime::environment(&lib)?;
        let path = |role: &str| cfg.models_dir.join(&manifest.by_role(role).file);
        for role in REQUIRED_ROLES {
            let p = path(role);
            if !p.is_file() {
                return Err(InferenceError::Runtime(format!(
                    "model file {} is missing; run `vigil models fetch`",
                    p.display()
                )));
            }
        }
        // The PAD model is a score only: without its file the stack runs and reports no `pad`,
        // unless the manifest marks it required. A file that is there but fails to load is an
        // error either way.
        let pad_model = manifest.find_role(PAD_ROLE).and_then(|m| {
            let p = cfg.models_dir.join(&m.file);
            if p.is_file() {
                Some(Ok((m, p)))
            } else if m.required {
                Some(Err(InferenceError::Runtime(format!(
                    "model file {} is missing; run `vigil models fetch`",
                    p.display()
                ))))
            } else {
                tracing::warn!(
                    model = %m.tag(),
                    path = %p.display(),
                    "presentation-attack model missing; frames get no `pad` score (run `vigil models fetch`)"
                );
                None
            }
        });
        let pad_model = pad_model.transpose()?;
        let (t, d) = (cfg.intra_threads, cfg.device);
        let mut pool = Vec::new();
        for _ in 0..sets.max(1) {
            pool.push(ModelSet {
                yunet: YuNet::load(env, &path("face_detection"), t, d)?,
                sface: SFace::load(env, &path("face_recognition"), t, d, batch)?,
                liveness: Liveness::load(env, &path("liveness"), t, d, batch)?,
                coco: CocoSsd::load(env, &path("phone_detection"), t, d)?,
                pad: match &pad_model {
                    Some((_, p)) => Some(Pad::load(env, p, t, d)?),
                    None => None,
                },
            });
        }
        // The order the models run in; the PAD model, when loaded, comes last.
        let mut models: Vec<String> = REQUIRED_ROLES
            .iter()
            .map(|r| manifest.by_role(r).tag())
            .collect();
        if let Some((m, p)) = &pad_model {
            tracing::info!(model = %m.tag(), path = %p.display(), "presentation-attack model loaded (a score only)");
            models.push(m.tag());
        }
        Ok(Self {
            sets: Mutex::new(pool),
            returned: Condvar::new(),
            thresholds: cfg.thresholds.clone(),
            max_side: cfg.max_side,
            max_pixels: cfg.max_pixels,
            has_pad: pad_model.is_some(),
            models,
            phone_model: manifest.by_role("phone_detection").tag(),
            carried_models: [
                manifest.by_role("face_recognition").tag(),
                manifest.by_role("liveness").tag(),
            ]
            .into_iter()
            .chain(pad_model.as_ref().map(|(m, _)| m.tag()))
            .collect(),
        })
    }

    /// Run `f` with a free set of sessions (waiting for one if all are busy).
    /// The set goes back to the pool however `f` ends, a panic included.
    fn with_set<T>(&self, f: impl FnOnce(&mut ModelSet) -> T) -> T {
        let set = {
            let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(s) = sets.pop() {
                    break s;
                }
                sets = self.returned.wait(sets).unwrap_or_else(|e| e.into_inner());
            }
        };
        let mut lent = Lent {
            stack: self,
            set: Some(set),
        };
        f(lent.set.as_mut().expect("lent until dropped"))
    }

    /// Decode a frame and scale a copy to fit the detectors. Returns the original, the scaled
    /// copy, and the factor from original to scaled coordinates.
    fn prepare(&self, jpeg: &[u8]) -> Result<(RgbImage, RgbImage, f32), InferenceError> {
        let img = imageops::decode_jpeg_limited(jpeg, self.max_pixels)?;
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

    /// Analyse one frame against `reference` (an L2-normalised embedding, if enrolled), with
    /// every model.
    pub fn analyze(
        &self,
        jpeg: &[u8],
        reference: Option<&[f32]>,
    ) -> Result<(IdentityAnalysis, Stages), InferenceError> {
        self.analyze_with(jpeg, reference, true, None)
    }

    /// [`IdentityStack::analyze`]; without `phone_check` the phone detector runs only when the
    /// verdict is not `ok` without it (so that a frame that may become evidence is fully
    /// analysed), and the analysis lists it as `skipped` otherwise.
    ///
    /// With a `track` ([`vigil_core::wire::Frame::track`]), a frame whose only face is on it (box
    /// and landmarks within `track_iou_min` and `track_shift_max`), passes the quality gate and
    /// shows no phone where one was looked for is `ok` without the recogniser and the liveness
    /// models (listed in `carried`): the identity is carried over from the track's last full
    /// analysis, which the edge keeps recent. Anything else (no face, a second face, a jump, a
    /// poor face, a phone) runs every model on the frame, as without a track.
    pub fn analyze_with(
        &self,
        jpeg: &[u8],
        reference: Option<&[f32]>,
        phone_check: bool,
        track: Option<&Track>,
    ) -> Result<(IdentityAnalysis, Stages), InferenceError> {
        self.analyze_batch(&[BatchFrame {
            jpeg,
            reference,
            phone_check,
            track,
        }])
        .pop()
        .expect("one result per frame")
    }

    /// [`IdentityStack::analyze_with`] for several frames (of any clients) at once, one result
    /// per frame in their order. Each frame is decided exactly as alone; what changes is that
    /// the recogniser and fr_liveness run once on the faces of every frame that needs them
    /// (a batch, with a stack loaded for one: [`IdentityStack::load_with`]). A frame's stages
    /// get an equal share of a batched run's time. A frame that cannot be decoded fails alone;
    /// a batched run that fails fails the frames in it.
    pub fn analyze_batch(
        &self,
        frames: &[BatchFrame<'_>],
    ) -> Vec<Result<(IdentityAnalysis, Stages), InferenceError>> {
        // Decoding holds no model set.
        let mut prepared: Vec<Result<Prepared, InferenceError>> = frames
            .iter()
            .map(|_| Err(InferenceError::Runtime("not analysed".into())))
            .collect();
        for (slot, frame) in prepared.iter_mut().zip(frames) {
            let clock = Instant::now();
            *slot = self
                .prepare(frame.jpeg)
                .map(|(img, small, scale)| Prepared {
                    img,
                    small,
                    scale,
                    stages: vec![("preprocess", clock.elapsed().as_secs_f64())],
                });
        }
        self.with_set(|set| {
            let mut out: Vec<Option<Result<(IdentityAnalysis, Stages), InferenceError>>> =
                frames.iter().map(|_| None).collect();
            let mut full: Vec<Full> = Vec::new();
            for (i, (frame, p)) in frames.iter().zip(prepared).enumerate() {
                match p.and_then(|p| self.detect(set, frame, p)) {
                    Ok(Detected::Carried(done)) => out[i] = Some(Ok(*done)),
                    Ok(Detected::Full(f)) => full.push(Full { at: i, ..*f }),
                    Err(e) => out[i] = Some(Err(e)),
                }
            }
            if let Err(e) = self.judge_batch(set, &mut full) {
                if full.len() > 1 {
                    // A batched run that fails (a device out of memory, say) fails no frame
                    // by itself: each is tried alone.
                    let mut alone = Vec::new();
                    for mut f in full.drain(..) {
                        match self.judge_batch(set, std::slice::from_mut(&mut f)) {
                            Ok(()) => alone.push(f),
                            Err(e) => out[f.at] = Some(Err(e)),
                        }
                    }
                    full = alone;
                } else {
                    for f in full.drain(..) {
                        out[f.at] = Some(Err(e.clone()));
                    }
                }
            }
            for f in full {
                let (at, reference) = (f.at, frames[f.at].reference);
                out[at] = Some(self.finish(set, f, reference, frames[at].phone_check));
            }
            out.into_iter()
                .map(|r| r.expect("every frame has a result"))
                .collect()
        })
    }

    /// A decoded frame's faces; a frame on its track, with one face of good quality and no
    /// phone where one was looked for, is done here (every model but the recogniser and the
    /// liveness models, which it carries over).
    fn detect(
        &self,
        set: &mut ModelSet,
        frame: &BatchFrame<'_>,
        p: Prepared,
    ) -> Result<Detected, InferenceError> {
        let t = &self.thresholds;
        let Prepared {
            img,
            small,
            scale,
            mut stages,
        } = p;
        let clock = Instant::now();
        // Detection runs on the scaled copy; liveness and alignment on the original pixels, as
        // the models were made for.
        let faces = self.faces(set, &small, scale)?;
        stages.push(("yunet", clock.elapsed().as_secs_f64()));
        let clock = Instant::now();
        // The largest face is the one to verify: aligned once, its quality measured, whether
        // the frame is carried or every model runs.
        let main = faces
            .iter()
            .enumerate()
            .max_by(|(_, a), (_, b)| (a.w * a.h).total_cmp(&(b.w * b.h)))
            .map(|(i, _)| i);
        let main_track = main.map(|i| track_of(&faces[i]));
        let aligned = match main {
            Some(m) => {
                let face = &faces[m];
                let (aligned, sim) = SFace::align(&img, face)?;
                let mut q = quality::measure(&aligned, face, &sim);
                q.failed = quality::failure(&q, t).map(str::to_owned);
                Some((aligned, q))
            }
            None => None,
        };
        let mut align_s = clock.elapsed().as_secs_f64();
        // Only an enrolled client has an identity to carry over.
        if let (Some(track), Some(m), 1, Some(_), Some((face_img, q))) =
            (frame.track, main, faces.len(), frame.reference, &aligned)
            && on_track(&faces[m], track, t)
        {
            stages.push(("align", align_s));
            // Counted here, not again in `sface` if the frame is judged after all.
            align_s = 0.0;
            let phone = if frame.phone_check {
                let clock = Instant::now();
                let found = set.coco.phones(&small, t.phone_score, t.phone_nms_iou)?;
                stages.push(("cocossd", clock.elapsed().as_secs_f64()));
                found.first().map(|p| p.score)
            } else {
                None
            };
            if q.failed.is_none() && phone.is_none() {
                let skipped = if frame.phone_check {
                    Vec::new()
                } else {
                    vec![self.phone_model.clone()]
                };
                return Ok(Detected::Carried(Box::new((
                    IdentityAnalysis {
                        verdict: Verdict::Ok,
                        faces: vec![face_box(&faces[m])],
                        identity: None,
                        liveness: None,
                        phone: None,
                        models: self.models.clone(),
                        skipped,
                        carried: self.carried_models.clone(),
                        thresholds: self.thresholds_used(),
                        quality: Some(q.clone()),
                        appearance: Some(
                            vigil_core::wire::pack_appearance(&imageops::appearance(face_img))
                                .into(),
                        ),
                        track: main_track,
                    },
                    stages,
                ))));
            }
            // A poor face or a phone: the frame may become evidence, so every model runs.
        }
        Ok(Detected::Full(Box::new(Full {
            at: 0,
            img,
            small,
            scale,
            faces,
            main,
            main_track,
            aligned,
            align_s,
            embedding: None,
            p_live: None,
            stages,
        })))
    }

    /// The recogniser and fr_liveness, each once on the main faces of `full`; each frame's
    /// `sface` and `fr_liveness` stages get its share of the run.
    fn judge_batch(&self, set: &mut ModelSet, full: &mut [Full]) -> Result<(), InferenceError> {
        let with_face: Vec<usize> = (0..full.len())
            .filter(|&i| full[i].aligned.is_some())
            .collect();
        let share = |started: Instant| started.elapsed().as_secs_f64() / with_face.len() as f64;
        let clock = Instant::now();
        let aligned: Vec<&RgbImage> = with_face
            .iter()
            .map(|&i| &full[i].aligned.as_ref().expect("filtered").0)
            .collect();
        let embeddings = set.sface.embed_batch(&aligned)?;
        let sface_s = if with_face.is_empty() {
            0.0
        } else {
            share(clock)
        };
        let clock = Instant::now();
        let faces: Vec<(&RgbImage, &Face)> = with_face
            .iter()
            .map(|&i| {
                let f = &full[i];
                (&f.img, &f.faces[f.main.expect("a main face")])
            })
            .collect();
        let p_live = set.liveness.p_live_batch(&faces)?;
        let live_s = if with_face.is_empty() {
            0.0
        } else {
            share(clock)
        };
        for f in full.iter_mut() {
            f.stages.push(("sface", f.align_s));
        }
        for ((i, embedding), p) in with_face.into_iter().zip(embeddings).zip(p_live) {
            let f = &mut full[i];
            f.stages.last_mut().expect("sface").1 += sface_s;
            f.stages.push(("fr_liveness", live_s));
            f.embedding = Some(embedding);
            f.p_live = Some(p);
        }
        Ok(())
    }

    /// A fully analysed frame's verdict: the PAD model and, when due or when the verdict is
    /// not `ok` without it, the phone detector.
    fn finish(
        &self,
        set: &mut ModelSet,
        f: Full,
        reference: Option<&[f32]>,
        phone_check: bool,
    ) -> Result<(IdentityAnalysis, Stages), InferenceError> {
        let t = &self.thresholds;
        let Full {
            img,
            small,
            scale,
            faces,
            main,
            main_track,
            aligned,
            embedding,
            p_live,
            mut stages,
            ..
        } = f;
        let mut clock = Instant::now();
        let mut lap = |name: &'static str, stages: &mut Stages| {
            stages.push((name, clock.elapsed().as_secs_f64()));
            clock = Instant::now();
        };
        let liveness = match (main, p_live) {
            (Some(m), Some(p_live)) => {
                // P(real) from the PAD model: reported for the edge's suspicion, never read by
                // `verdict` below.
                let pad = match set.pad.as_mut() {
                    Some(model) => {
                        let p = model.p_real(&img, &faces[m])?;
                        lap("minifasnet", &mut stages);
                        Some(p)
                    }
                    None => None,
                };
                Some(LivenessScore {
                    p_live,
                    pad,
                    live: p_live >= t.live_min,
                    temporal: None,
                })
            }
            _ => None,
        };
        let identity = match (&embedding, reference) {
            (Some(e), Some(reference)) => {
                let similarity = cosine(e, reference);
                Some(IdentityScore {
                    similarity,
                    matched: similarity >= t.match_cosine,
                })
            }
            _ => None,
        };
        let unscale = 1.0 / scale;
        let mut phones = |set: &mut ModelSet, stages: &mut Stages| {
            let found = set.coco.phones(&small, t.phone_score, t.phone_nms_iou)?;
            lap("cocossd", stages);
            Ok::<_, InferenceError>(found.first().map(|p| PhoneBox {
                score: p.score,
                x: p.x * unscale,
                y: p.y * unscale,
                w: p.w * unscale,
                h: p.h * unscale,
            }))
        };
        let (quality, appearance) = match &aligned {
            // The appearance leaves the worker, never the embedding (a template).
            Some((face, q)) => (
                Some(q.clone()),
                Some(vigil_core::wire::pack_appearance(&imageops::appearance(face)).into()),
            ),
            None => (None, None),
        };
        let judge = |phone: Option<&PhoneBox>| {
            verdict(faces.len(), quality.as_ref(), identity.as_ref(), phone, t)
        };
        let mut phone = None;
        let mut verdict = Verdict::Ok;
        let mut phone_ran = false;
        if !phone_check {
            verdict = judge(None);
        }
        if phone_check || verdict != Verdict::Ok {
            phone = phones(set, &mut stages)?;
            verdict = judge(phone.as_ref());
            phone_ran = true;
        }
        let skipped = if phone_ran {
            Vec::new()
        } else {
            vec![self.phone_model.clone()]
        };
        Ok((
            IdentityAnalysis {
                verdict,
                faces: faces.iter().map(face_box).collect(),
                identity,
                liveness,
                phone,
                models: self.models.clone(),
                skipped,
                carried: Vec::new(),
                thresholds: self.thresholds_used(),
                quality,
                appearance,
                track: main_track,
            },
            stages,
        ))
    }

    /// The thresholds a verdict is decided with, as results report them.
    fn thresholds_used(&self) -> std::collections::BTreeMap<String, f32> {
        let t = &self.thresholds;
        [
            ("face_score", t.face_score),
            ("match_cosine", t.match_cosine),
            ("live_min", t.live_min),
            ("phone_score", t.phone_score),
            ("face_min_px", t.face_min_px),
            ("sharpness_min", t.sharpness_min),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Align `face`, measure its quality, and embed it.
    fn judge(
        &self,
        set: &mut ModelSet,
        img: &RgbImage,
        face: &Face,
    ) -> Result<Judged, InferenceError> {
        let (aligned, m) = SFace::align(img, face)?;
        let mut q = quality::measure(&aligned, face, &m);
        q.failed = quality::failure(&q, &self.thresholds).map(str::to_owned);
        Ok(Judged {
            quality: q,
            embedding: set.sface.embed_aligned(&aligned)?,
        })
    }

    /// The embedding of the largest face in a photo, whatever its quality (for measuring the
    /// recogniser itself); `None` without a face.
    pub fn embed_largest(&self, jpeg: &[u8]) -> Result<Option<Vec<f32>>, InferenceError> {
        let (img, small, scale) = self.prepare(jpeg)?;
        self.with_set(|set| {
            let faces = self.faces(set, &small, scale)?;
            match faces
                .iter()
                .max_by(|a, b| (a.w * a.h).total_cmp(&(b.w * b.h)))
            {
                Some(face) => Ok(Some(set.sface.embed(&img, face)?)),
                None => Ok(None),
            }
        })
    }

    /// The reference embedding of a photo that shows exactly one face, good enough to judge.
    pub fn enroll(&self, jpeg: &[u8]) -> Result<Vec<f32>, EnrollError> {
        let (img, small, scale) = self.prepare(jpeg)?;
        self.with_set(|set| {
            let faces = self.faces(set, &small, scale)?;
            match faces.len() {
                0 => Err(EnrollError::NoFace),
                1 => {
                    let j = self.judge(set, &img, &faces[0])?;
                    match quality::failure(&j.quality, &self.thresholds) {
                        Some(reason) => Err(EnrollError::LowQuality(reason)),
                        None => Ok(j.embedding),
                    }
                }
                n => Err(EnrollError::MultipleFaces(n)),
            }
        })
    }

    /// A template from several reference photos (or frames of a short capture): each must
    /// pass [`IdentityStack::enroll`], and each must match the mean of the others, so that a
    /// photo of someone else is refused rather than averaged in.
    pub fn enroll_many(&self, photos: &[Vec<u8>]) -> Result<Enrollment, EnrollError> {
        if photos.is_empty() {
            return Err(EnrollError::Empty);
        }
        let embeddings = photos
            .iter()
            .enumerate()
            .map(|(i, p)| {
                self.enroll(p).map_err(|e| EnrollError::Photo {
                    index: i + 1,
                    source: Box::new(e),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let threshold = self.thresholds.match_cosine;
        if embeddings.len() > 1 {
            for (i, e) in embeddings.iter().enumerate() {
                let others: Vec<&[f32]> = embeddings
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, o)| o.as_slice())
                    .collect();
                let similarity = cosine(e, &normalised_mean(&others));
                if similarity < threshold {
                    return Err(EnrollError::Outlier {
                        index: i + 1,
                        similarity,
                        threshold,
                    });
                }
            }
        }
        let all: Vec<&[f32]> = embeddings.iter().map(Vec::as_slice).collect();
        let embedding = normalised_mean(&all);
        let similarities: Vec<f32> = embeddings.iter().map(|e| cosine(e, &embedding)).collect();
        let lowest = similarities.iter().copied().fold(f32::MAX, f32::min);
        Ok(Enrollment {
            embedding,
            margin: lowest - threshold,
            similarities,
        })
    }

    /// Whether the presentation-attack model is loaded (frames then carry `pad`).
    pub fn has_pad(&self) -> bool {
        self.has_pad
    }

    /// The recognition model's tag, recorded with each reference.
    pub fn recognition_model(&self) -> &str {
        &self.models[1]
    }
}

/// The L2-normalised mean of unit vectors.
pub fn normalised_mean(vectors: &[&[f32]]) -> Vec<f32> {
    let dim = vectors.first().map_or(0, |v| v.len());
    let mut sum = vec![0f32; dim];
    for v in vectors {
        for (s, x) in sum.iter_mut().zip(v.iter()) {
            *s += x;
        }
    }
    super::models::l2_normalised(&sum)
}

/// The first rule that applies: no face, several faces, a face too poor to judge (unless a
/// phone is in view: a phone is judged whatever the face; and unless the face is only turned
/// and its identity still clearly someone else's: the wrong person outranks a turned face),
/// the wrong person (or nobody enrolled to compare with), a phone, otherwise ok.
///
/// Liveness is not a frame's verdict: a single frame's P(live) and the stream's signals only
/// raise a suspicion in the edge, which an active challenge decides (`vigil_core::challenge`).
pub fn verdict(
    faces: usize,
    quality: Option<&FaceQuality>,
    identity: Option<&IdentityScore>,
    phone: Option<&PhoneBox>,
    t: &Thresholds,
) -> Verdict {
    let failed = quality.and_then(|q| q.failed.as_deref());
    if faces == 0 {
        Verdict::NoFace
    } else if faces > 1 {
        Verdict::MultipleFaces
    } else if phone.is_some() && failed.is_some() {
        Verdict::Phone
    } else if failed == Some("turned")
        && identity.is_some_and(|i| i.similarity < t.turned_match_cosine)
    {
        Verdict::WrongPerson
    } else if failed.is_some() {
        Verdict::LowQuality
    } else if !identity.is_some_and(|i| i.matched) {
        Verdict::WrongPerson
    } else if phone.is_some() {
        Verdict::Phone
    } else {
        Verdict::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_takes_the_first_rule_that_applies() {
        let t = Thresholds::default();
        let good = FaceQuality {
            face_px: 120.0,
            sharpness: 200.0,
            brightness: 120.0,
            yaw: 0.0,
            pitch: 0.5,
            failed: None,
        };
        let poor = FaceQuality {
            failed: Some("blurred".into()),
            ..good.clone()
        };
        let turned = FaceQuality {
            yaw: 0.8,
            failed: Some("turned".into()),
            ..good.clone()
        };
        let me = IdentityScore {
            similarity: 0.8,
            matched: true,
        };
        let me_turned = IdentityScore {
            similarity: 0.3,
            matched: false,
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
        let v = |faces, q: &FaceQuality, i: Option<&IdentityScore>, p: Option<&PhoneBox>| {
            verdict(faces, Some(q), i, p, &t)
        };
        assert_eq!(v(0, &good, None, Some(&phone)), Verdict::NoFace);
        assert_eq!(v(2, &good, Some(&other), None), Verdict::MultipleFaces);
        assert_eq!(
            v(1, &good, Some(&other), Some(&phone)),
            Verdict::WrongPerson
        );
        assert_eq!(v(1, &good, None, None), Verdict::WrongPerson);
        assert_eq!(v(1, &good, Some(&me), Some(&phone)), Verdict::Phone);
        assert_eq!(v(1, &good, Some(&me), None), Verdict::Ok);
        // A face too poor to judge is not judged...
        assert_eq!(v(1, &poor, Some(&other), None), Verdict::LowQuality);
        assert_eq!(v(1, &poor, Some(&me), Some(&phone)), Verdict::Phone);
        // ...but a turned face that is clearly someone else's is the wrong person, while the
        // enrolled person turned away is only low quality.
        assert_eq!(v(1, &turned, Some(&other), None), Verdict::WrongPerson);
        assert_eq!(v(1, &turned, Some(&me_turned), None), Verdict::LowQuality);
        assert_eq!(v(1, &turned, None, None), Verdict::LowQuality);
    }
}
