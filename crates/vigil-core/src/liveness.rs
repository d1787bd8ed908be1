//! Passive liveness over a client's stream: does the face in front of the camera look like a
//! live one, judged from how it changes over the last seconds rather than from one frame.
//!
//! Passive signals never act by themselves: an identity embedding is built to stay the same
//! when a face moves, and a still, honest person can look like a photo for seconds. They raise
//! a *suspicion*, and the edge answers a suspicion with an active challenge
//! ([`crate::challenge`]), which decides.
//!
//! Pure and deterministic, like [`crate::policy`]: [`StreamLiveness::fuse`] takes one frame's
//! analysis and the time, adds the window's evidence to its liveness, and says when a signal
//! raises a suspicion. The edge session runs one per client, where results arrive in order;
//! replay and `vigil eval` run the same code.
//!
//! The signals, measured by `vigil eval` (see `docs/liveness.md`):
//! - **still**: a live face keeps changing (expression, blinks, breath, pose), so its
//!   appearance (the face aligned on its landmarks, its grey levels pooled to 28x28 cells, less
//!   their mean: no model runs for it) drifts away from where it was a second or two ago, far
//!   more than it jitters between consecutive frames. A photo, a screen showing a still, or the
//!   same frame replayed, moved about or not, changes only by the alignment's jitter and the
//!   sensor's noise: its drift over seconds stays at the jitter between neighbours. The spoof
//!   fires when `drift <= still_ratio x jitter + still_floor` over a window with enough faces.
//! - **model**: the single-frame model's P(live), as a median over the window. On webcam video
//!   that model scores honest faces almost as low as printed photos, so it only decides when
//!   the whole window sits below `p_live_window_min`, a level no honest window reached.
//! - **pad**: the presentation-attack model's P(real), as a median over the window, below
//!   `pad_window_min`.
//! - **away**: frames keep coming with a face, but none good enough to judge, for `away_ms`
//!   (a face kept turned away, or hidden in the dark).
//! - **disagree**: the presentation-attack model is sure of both within one window: at least
//!   `disagree_faces` faces below `pad_low` and as many above `pad_high` (live frames mixed
//!   with a screen or a print, which a median hides).
//!
//! The still test must hold for `still_faces` faces in a row before it is a suspicion.

use std::collections::VecDeque;

use serde::Deserialize;

use crate::wire::{IdentityAnalysis, TemporalScore, Verdict, unpack_appearance};

/// `[liveness]` in the config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LivenessConfig {
    /// How far back the evidence reaches, in ms [VIGIL_LIVENESS_WINDOW_MS].
    pub window_ms: u64,
    /// Faces at least this far apart in time measure the drift, in ms.
    pub drift_lag_ms: u64,
    /// Faces needed in the window before it says anything.
    pub min_faces: usize,
    /// Most faces kept per client (the window's memory bound).
    pub max_faces: usize,
    /// Still when the drift is at most this many times the jitter...
    /// [VIGIL_LIVENESS_STILL_RATIO]
    pub still_ratio: f32,
    /// ...plus this (so that a frame replayed byte for byte, with zero jitter, is still).
    pub still_floor: f32,
    /// A suspicion when the window's median single-frame P(live) is below this.
    pub p_live_window_min: f32,
    /// The models' window signals (`model`, `pad`) need at least this many scored faces in
    /// the window besides `min_faces` faces.
    pub min_scores: usize,
    /// A suspicion when the window's median presentation-attack P(real) is below this
    /// [VIGIL_LIVENESS_PAD_WINDOW_MIN].
    pub pad_window_min: f32,
    /// The still test must hold this many faces in a row to raise a suspicion.
    pub still_faces: usize,
    /// A suspicion when faces keep arriving but none could be judged for this long, in ms.
    pub away_ms: u64,
    /// The window's frames disagree when at least `disagree_faces` score P(real) below
    /// `pad_low` and as many above `pad_high`; 0 turns it off.
    pub disagree_faces: usize,
    pub pad_low: f32,
    pub pad_high: f32,
}

impl Default for LivenessConfig {
    /// Calibrated with `vigil eval`, leaving one clip out at a time (docs/liveness.md). A
    /// suspicion costs an honest candidate one challenge, so the levels are set for rare
    /// suspicions on honest video, not for catching every attack: the start challenge does that.
    fn default() -> Self {
        Self {
            window_ms: 4_000,
            drift_lag_ms: 1_500,
            min_faces: 8,
            max_faces: 64,
            still_ratio: 1.5,
            still_floor: 0.0005,
            p_live_window_min: 0.002,
            min_scores: 3,
            pad_window_min: 0.47,
            still_faces: 15,
            away_ms: 15_000,
            disagree_faces: 3,
            pad_low: 0.2,
            pad_high: 0.9,
        }
    }
}

impl LivenessConfig {
    /// Every problem at once.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.drift_lag_ms == 0 || self.drift_lag_ms >= self.window_ms {
            errors.push(format!(
                "liveness.drift_lag_ms = {} must be within 1..window_ms ({})",
                self.drift_lag_ms, self.window_ms
            ));
        }
        if self.min_faces < 3 || self.min_faces > self.max_faces || self.max_faces > 1000 {
            errors.push(format!(
                "liveness: min_faces = {} and max_faces = {} must satisfy 3 <= min <= max <= 1000",
                self.min_faces, self.max_faces
            ));
        }
        let non_negative = |v: f32| v.is_finite() && v >= 0.0;
        if !non_negative(self.still_ratio) || !non_negative(self.still_floor) {
            errors.push("liveness.still_ratio and still_floor must be 0 or more".into());
        }
        if !(0.0..=1.0).contains(&self.pad_low)
            || !(0.0..=1.0).contains(&self.pad_high)
            || self.pad_low >= self.pad_high
        {
            errors.push(format!(
                "liveness.pad_low = {} and pad_high = {} must satisfy 0 <= low < high <= 1",
                self.pad_low, self.pad_high
            ));
        }
        if !(0.0..=1.0).contains(&self.pad_window_min) {
            errors.push(format!(
                "liveness.pad_window_min = {} must be within 0..=1",
                self.pad_window_min
            ));
        }
        if self.min_scores == 0 || self.min_scores > self.min_faces {
            errors.push(format!(
                "liveness.min_scores = {} must be within 1..=min_faces ({})",
                self.min_scores, self.min_faces
            ));
        }
        if self.still_faces == 0 || self.still_faces > 1000 {
            errors.push(format!(
                "liveness.still_faces = {} must be within 1..=1000",
                self.still_faces
            ));
        }
        if self.away_ms < 1_000 {
            errors.push(format!(
                "liveness.away_ms = {} must be at least 1000",
                self.away_ms
            ));
        }
        if !(0.0..=1.0).contains(&self.p_live_window_min) {
            errors.push(format!(
                "liveness.p_live_window_min = {} must be within 0..=1",
                self.p_live_window_min
            ));
        }
        errors
    }
}

/// One face in the window.
#[derive(Debug, Clone)]
struct Seen {
    at_ms: u64,
    /// The face's appearance, L2-normalised.
    appearance: Vec<f32>,
    /// The liveness models' scores, when they ran on the frame (not on a frame that carried
    /// its identity over, [`crate::cadence::IdentityCadence`]).
    p_live: Option<f32>,
    pad: Option<f32>,
}

/// Which passive signal raised a suspicion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspicion {
    Still,
    Model,
    Pad,
    Away,
    Disagree,
}

impl Suspicion {
    pub fn as_str(self) -> &'static str {
        match self {
            Suspicion::Still => "still",
            Suspicion::Model => "model",
            Suspicion::Pad => "pad",
            Suspicion::Away => "away",
            Suspicion::Disagree => "disagree",
        }
    }
}

/// One client's liveness evidence.
#[derive(Debug, Clone, Default)]
pub struct StreamLiveness {
    faces: VecDeque<Seen>,
    /// Faces in a row the still test held for.
    still_run: usize,
    /// When a face good enough to judge was last seen (or the stream began).
    judged_at_ms: Option<u64>,
    /// The newest window's score and when (`vigil eval` reads it for every face, scored or
    /// carried).
    last: Option<(u64, TemporalScore)>,
}

/// Cosine distance of two unit vectors, never below 0 (the same appearance twice is exactly
/// 0, not a rounding error either side of it).
fn distance(a: &[f32], b: &[f32]) -> f32 {
    (1.0 - a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()).max(0.0)
}

fn median(mut v: Vec<f32>) -> Option<f32> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f32::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl StreamLiveness {
    pub fn new() -> Self {
        Self::default()
    }

    /// The window's score when a face last entered it, and when (`vigil eval`).
    pub fn last(&self) -> Option<&(u64, TemporalScore)> {
        self.last.as_ref()
    }

    /// Add one face seen at `now_ms` and judge the window.
    pub fn observe(
        &mut self,
        cfg: &LivenessConfig,
        now_ms: u64,
        appearance: Vec<f32>,
        p_live: Option<f32>,
        pad: Option<f32>,
    ) -> (TemporalScore, Option<Suspicion>) {
        // Results can arrive a little out of time order (competing workers); the window is
        // ordered by arrival, which is the frames' order per session.
        self.faces.push_back(Seen {
            at_ms: now_ms,
            appearance,
            p_live,
            pad,
        });
        while self.faces.len() > cfg.max_faces
            || self
                .faces
                .front()
                .is_some_and(|f| f.at_ms + cfg.window_ms < now_ms)
        {
            self.faces.pop_front();
        }
        let f = &self.faces;
        let jitter = median(
            f.iter()
                .zip(f.iter().skip(1))
                .map(|(a, b)| distance(&a.appearance, &b.appearance))
                .collect(),
        );
        let mut long = Vec::new();
        for (i, a) in f.iter().enumerate() {
            for b in f.iter().skip(i + 1) {
                if b.at_ms.saturating_sub(a.at_ms) >= cfg.drift_lag_ms {
                    long.push(distance(&a.appearance, &b.appearance));
                }
            }
        }
        let drift = median(long);
        let p_live_median = median(f.iter().filter_map(|s| s.p_live).collect()).unwrap_or(1.0);
        let pad_median = median(f.iter().filter_map(|s| s.pad).collect());
        let enough = f.len() >= cfg.min_faces;
        // The models' medians need scores of their own: with track reuse, a few frames a
        // second carry them.
        let scored = enough && f.iter().filter(|s| s.p_live.is_some()).count() >= cfg.min_scores;
        let still = matches!((enough, jitter, drift),
            (true, Some(j), Some(d)) if d <= cfg.still_ratio * j + cfg.still_floor);
        self.still_run = if still { self.still_run + 1 } else { 0 };
        let spoof = if self.still_run >= cfg.still_faces {
            Some(Suspicion::Still)
        } else if scored && p_live_median < cfg.p_live_window_min {
            Some(Suspicion::Model)
        } else if scored && pad_median.is_some_and(|p| p < cfg.pad_window_min) {
            Some(Suspicion::Pad)
        } else if cfg.disagree_faces > 0
            && f.iter()
                .filter(|s| s.pad.is_some_and(|p| p < cfg.pad_low))
                .count()
                >= cfg.disagree_faces
            && f.iter()
                .filter(|s| s.pad.is_some_and(|p| p > cfg.pad_high))
                .count()
                >= cfg.disagree_faces
        {
            Some(Suspicion::Disagree)
        } else {
            None
        };
        let score = TemporalScore {
            faces: f.len() as u32,
            jitter: jitter.unwrap_or(0.0),
            drift: drift.unwrap_or(0.0),
            p_live_median,
            pad_median,
            spoof: spoof.map(|s| s.as_str().to_owned()),
        };
        self.last = Some((now_ms, score.clone()));
        (score, spoof)
    }

    /// Fuse the stream's evidence into one frame's analysis at `now_ms`: take the face's
    /// appearance out of it (it never travels further), add the window's score to its
    /// liveness, and say which signal, if any, raises a suspicion. The verdict is left alone:
    /// passive signals never act by themselves. Faces that failed the quality gate neither
    /// enter the window nor are judged by it; frames that keep coming with such faces only
    /// are the `away` signal.
    pub fn fuse(
        &mut self,
        cfg: &LivenessConfig,
        now_ms: u64,
        analysis: &mut IdentityAnalysis,
    ) -> Option<Suspicion> {
        let appearance = analysis.appearance.take();
        let since = *self.judged_at_ms.get_or_insert(now_ms);
        let judged = matches!(
            analysis.verdict,
            Verdict::WrongPerson | Verdict::Phone | Verdict::Ok
        );
        if !judged {
            let away = analysis.verdict == Verdict::LowQuality
                && now_ms.saturating_sub(since) >= cfg.away_ms;
            if away {
                // Once per period, not on every frame.
                self.judged_at_ms = Some(now_ms);
                return Some(Suspicion::Away);
            }
            return None;
        }
        self.judged_at_ms = Some(now_ms);
        let appearance = appearance.and_then(|s| unpack_appearance(&s))?;
        let Some(liveness) = analysis.liveness.as_mut() else {
            // A frame that carried its identity over: its appearance counts, it has no scores.
            return self.observe(cfg, now_ms, appearance, None, None).1;
        };
        let (score, suspicion) =
            self.observe(cfg, now_ms, appearance, Some(liveness.p_live), liveness.pad);
        if suspicion.is_some() {
            liveness.live = false;
        }
        liveness.temporal = Some(score);
        suspicion
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::LivenessScore;

    /// A unit vector near `base`, moved by `amount` along coordinate `axis`.
    fn sig(base: usize, axis: usize, amount: f32) -> Vec<f32> {
        let mut v = vec![0f32; crate::wire::APPEARANCE_BYTES];
        v[base] = 1.0;
        v[axis] += amount;
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    fn cfg() -> LivenessConfig {
        LivenessConfig::default()
    }

    /// Feed `n` faces at 5 fps; returns the score of each.
    fn run(
        n: usize,
        mut appearance: impl FnMut(usize) -> Vec<f32>,
        p_live: f32,
    ) -> Vec<TemporalScore> {
        let mut s = StreamLiveness::new();
        (0..n)
            .map(|i| {
                s.observe(
                    &cfg(),
                    1_000 + i as u64 * 200,
                    appearance(i),
                    Some(p_live),
                    None,
                )
                .0
            })
            .collect()
    }

    #[test]
    fn the_same_frame_replayed_is_still_once_the_window_fills_and_stays_still() {
        let scores = run(40, |_| sig(0, 1, 0.2), 0.9);
        let first = scores.iter().position(|s| s.spoof.is_some()).unwrap();
        // Eight faces at 5 fps span 1.4 s; the ninth brings the first pair 1.5 s apart, and
        // the still test must then hold for still_faces faces in a row.
        assert_eq!(first, 8 + cfg().still_faces - 1, "{:?}", scores[first]);
        assert!(
            scores[first..]
                .iter()
                .all(|s| s.spoof.as_deref() == Some("still"))
        );
    }

    #[test]
    fn a_still_that_jitters_is_still() {
        // Random-looking jitter of one size, no drift: a photo moved about.
        let scores = run(40, |i| sig(0, 1 + (i * 7) % 5, 0.25), 0.9);
        assert!(
            scores[12 + cfg().still_faces..]
                .iter()
                .all(|s| s.spoof.as_deref() == Some("still"))
        );
    }

    #[test]
    fn a_face_that_drifts_is_live() {
        // Small steps that add up: consecutive faces are close, seconds apart they are not.
        let scores = run(40, |i| sig(0, 1, 0.03 * i as f32), 0.05);
        assert!(scores.iter().all(|s| s.spoof.is_none()), "{scores:?}");
        assert!(scores[20].drift > 3.0 * scores[20].jitter);
    }

    #[test]
    fn nothing_is_said_before_min_faces() {
        let scores = run(cfg().min_faces - 1, |_| sig(0, 1, 0.0), 0.0);
        assert!(scores.iter().all(|s| s.spoof.is_none()));
    }

    #[test]
    fn a_window_the_model_is_sure_about_is_a_spoof() {
        let scores = run(20, |i| sig(0, 1, 0.03 * i as f32), 0.001);
        assert_eq!(scores[19].spoof.as_deref(), Some("model"));
        // One honest-looking window median keeps it live.
        let scores = run(20, |i| sig(0, 1, 0.03 * i as f32), 0.006);
        assert!(scores[19].spoof.is_none());
    }

    #[test]
    fn a_still_that_moves_now_and_then_is_never_suspect() {
        // Still for 2 s, then a real change, over and over: the run never reaches still_faces.
        let scores = run(200, |i| sig(0, 1 + (i / 12) % 7, 0.3), 0.9);
        assert!(scores.iter().all(|s| s.spoof.is_none()));
    }

    #[test]
    fn a_window_the_pad_model_is_sure_about_is_suspect() {
        let c = LivenessConfig {
            pad_window_min: 0.3,
            ..cfg()
        };
        let mut s = StreamLiveness::new();
        let got: Vec<_> = (0..20)
            .map(|i| {
                s.observe(
                    &c,
                    i * 200,
                    sig(0, 1, 0.03 * i as f32),
                    Some(0.5),
                    Some(0.1),
                )
                .1
            })
            .collect();
        assert_eq!(got[19], Some(Suspicion::Pad));
        assert!(got[..c.min_faces - 1].iter().all(Option::is_none));
    }

    #[test]
    fn live_frames_mixed_with_frames_the_pad_model_is_sure_of_disagree() {
        let c = cfg();
        let mut s = StreamLiveness::new();
        // A live face every other frame, a screen between: the median stays high.
        let got: Vec<_> = (0..12)
            .map(|i| {
                let pad = if i % 2 == 0 { 0.99 } else { 0.05 };
                s.observe(
                    &c,
                    i * 200,
                    sig(0, 1, 0.03 * i as f32),
                    Some(0.5),
                    Some(pad),
                )
                .1
            })
            .collect();
        assert_eq!(got[5], Some(Suspicion::Disagree), "{got:?}");
        // Honest frames (every one above 0.82 on the data here) never disagree.
        let mut s = StreamLiveness::new();
        assert!((0..40).all(|i| {
            let pad = 0.82 + 0.17 * ((i % 5) as f32 / 4.0);
            s.observe(
                &c,
                i * 200,
                sig(0, 1, 0.03 * i as f32),
                Some(0.5),
                Some(pad),
            )
            .1
            .is_none()
        }));
    }

    #[test]
    fn carried_faces_feed_the_still_test_and_only_scored_ones_the_medians() {
        // A photo replayed, its scores on one frame in five (track reuse): still all the same.
        let mut s = StreamLiveness::new();
        let got: Vec<_> = (0..40)
            .map(|i| {
                let scored = i % 5 == 0;
                s.observe(&cfg(), i * 200, sig(0, 1, 0.2), scored.then_some(0.9), None)
                    .1
            })
            .collect();
        assert_eq!(got[39], Some(Suspicion::Still));
        // The presentation-attack model sure on the scored frames: a suspicion once
        // `min_scores` of them are in a window of `min_faces` faces, not before.
        let c = LivenessConfig {
            pad_window_min: 0.3,
            ..cfg()
        };
        let mut s = StreamLiveness::new();
        let got: Vec<_> = (0..20)
            .map(|i| {
                let scored = i % 5 == 0;
                let appearance = sig(0, 1, 0.03 * i as f32);
                s.observe(
                    &c,
                    i * 200,
                    appearance,
                    scored.then_some(0.5),
                    scored.then_some(0.1),
                )
                .1
            })
            .collect();
        assert_eq!(got.iter().position(Option::is_some), Some(10), "{got:?}");
        assert_eq!(got[10], Some(Suspicion::Pad));
    }

    #[test]
    fn old_faces_leave_the_window() {
        let mut s = StreamLiveness::new();
        for i in 0..10 {
            s.observe(&cfg(), i * 200, sig(0, 1, 0.0), Some(0.9), None);
        }
        // Ten seconds later, one new face: the window holds only it.
        let (score, _) = s.observe(&cfg(), 12_000, sig(0, 1, 0.0), Some(0.9), None);
        assert_eq!((score.faces, score.spoof), (1, None));
    }

    #[test]
    fn appearances_survive_their_wire_form() {
        let e = sig(3, 9, 0.4);
        let back = unpack_appearance(&crate::wire::pack_appearance(&e)).unwrap();
        assert!(distance(&e, &back) < 1e-3);
        let n = crate::wire::APPEARANCE_BYTES;
        assert_eq!(unpack_appearance(&vec![0; n]), None);
        // An appearance of any other length (a hostile or foreign result, or an older
        // worker's 128-byte embedding) is ignored.
        assert_eq!(unpack_appearance(&[1; 128]), None);
        assert_eq!(unpack_appearance(&vec![1; n - 1]), None);
        assert_eq!(unpack_appearance(&[1; 4096]), None);
    }

    fn analysis(verdict: Verdict, appearance: &[f32]) -> IdentityAnalysis {
        IdentityAnalysis {
            verdict,
            faces: vec![],
            identity: None,
            liveness: Some(LivenessScore {
                p_live: 0.9,
                pad: None,
                live: true,
                temporal: None,
            }),
            phone: None,
            models: vec![],
            skipped: Vec::new(),
            carried: Vec::new(),
            thresholds: Default::default(),
            quality: None,
            appearance: Some(crate::wire::pack_appearance(appearance).into()),
            track: None,
        }
    }

    #[test]
    fn fuse_raises_a_suspicion_strips_the_appearance_and_leaves_the_verdict() {
        let mut s = StreamLiveness::new();
        let mut raised = Vec::new();
        let mut last = None;
        for i in 0..30u64 {
            let mut a = analysis(Verdict::Ok, &sig(0, 1, 0.1));
            raised.push(s.fuse(&cfg(), i * 200, &mut a));
            assert!(a.appearance.is_none());
            last = Some(a);
        }
        let last = last.unwrap();
        assert_eq!(
            last.verdict,
            Verdict::Ok,
            "passive signals never change a verdict"
        );
        assert_eq!(raised[29], Some(Suspicion::Still));
        let l = last.liveness.unwrap();
        assert!(!l.live && l.temporal.unwrap().spoof.as_deref() == Some("still"));
        // A low-quality face is neither judged nor remembered.
        let mut a = analysis(Verdict::LowQuality, &sig(0, 1, 0.1));
        let before = s.faces.len();
        s.fuse(&cfg(), 6_000, &mut a);
        assert_eq!((a.verdict, s.faces.len()), (Verdict::LowQuality, before));
        assert!(a.appearance.is_none());
    }

    #[test]
    fn a_face_kept_away_is_suspect_once_per_away_period() {
        let mut s = StreamLiveness::new();
        let raised: Vec<usize> = (0..200u64)
            .filter_map(|i| {
                let mut a = analysis(Verdict::LowQuality, &sig(0, 1, 0.1));
                s.fuse(&cfg(), i * 200, &mut a).map(|x| {
                    assert_eq!(x, Suspicion::Away);
                    i as usize
                })
            })
            .collect();
        // At 5 fps, 15 s is 75 frames.
        assert_eq!(raised, [75, 150]);
        // A judged face in between restarts the clock.
        let mut a = analysis(Verdict::Ok, &sig(0, 1, 0.1));
        assert_eq!(s.fuse(&cfg(), 200 * 200, &mut a), None);
        let mut a = analysis(Verdict::LowQuality, &sig(0, 1, 0.1));
        assert_eq!(s.fuse(&cfg(), 200 * 200 + 14_000, &mut a), None);
    }
}
