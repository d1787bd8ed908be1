//! Liveness over a client's stream: is the face in front of the camera a live one, judged
//! from how it changes over the last seconds rather than from one frame.
//!
//! Pure and deterministic, like [`crate::policy`]: [`StreamLiveness::fuse`] takes one frame's
//! analysis and the time, and rewrites its liveness and verdict. The edge session runs one per
//! client, where results arrive in order; replay and `vigil eval` run the same code.
//!
//! Two signals, both measured by `vigil eval` (see `docs/liveness.md`):
//! - **still**: a live face keeps changing (expression, blinks, pose), so its signature (the
//!   recognition embedding) drifts away from where it was a second or two ago, far more than
//!   it jitters between consecutive frames. A photo, a screen showing a still, or the same
//!   frame replayed, moved about or not, changes only by the detector's jitter: its drift over
//!   seconds stays at the jitter between neighbours. The spoof fires when
//!   `drift <= still_ratio x jitter + still_floor` over a window with enough faces.
//! - **model**: the single-frame model's P(live), as a median over the window. On webcam video
//!   that model scores honest faces almost as low as printed photos, so it only decides when
//!   the whole window sits below `p_live_window_min`, a level no honest window reached.

use std::collections::VecDeque;

use serde::Deserialize;

use crate::wire::{IdentityAnalysis, TemporalScore, Verdict, unpack_signature};

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
    /// A spoof when the window's median single-frame P(live) is below this.
    pub p_live_window_min: f32,
}

impl Default for LivenessConfig {
    /// Calibrated with `vigil eval` (docs/liveness.md): honest windows had a drift/jitter
    /// ratio of at least 2.74 and replayed stills a median of 0.90 (highest 1.75); the lowest
    /// honest window median P(live) was 0.0058.
    fn default() -> Self {
        Self {
            window_ms: 4_000,
            drift_lag_ms: 1_500,
            min_faces: 8,
            max_faces: 64,
            still_ratio: 2.0,
            still_floor: 0.002,
            p_live_window_min: 0.002,
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
    /// The signature, L2-normalised.
    signature: Vec<f32>,
    p_live: f32,
}

/// One client's liveness evidence.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamLiveness {
    faces: VecDeque<Seen>,
}

fn distance(a: &[f32], b: &[f32]) -> f32 {
    1.0 - a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()
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
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Add one face seen at `now_ms` and judge the window.
    pub(crate) fn observe(
        &mut self,
        cfg: &LivenessConfig,
        now_ms: u64,
        signature: Vec<f32>,
        p_live: f32,
    ) -> TemporalScore {
        // Results can arrive a little out of time order (competing workers); the window is
        // ordered by arrival, which is the frames' order per session.
        self.faces.push_back(Seen {
            at_ms: now_ms,
            signature,
            p_live,
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
                .map(|(a, b)| distance(&a.signature, &b.signature))
                .collect(),
        );
        let mut long = Vec::new();
        for (i, a) in f.iter().enumerate() {
            for b in f.iter().skip(i + 1) {
                if b.at_ms.saturating_sub(a.at_ms) >= cfg.drift_lag_ms {
                    long.push(distance(&a.signature, &b.signature));
                }
            }
        }
        let drift = median(long);
        let p_live_median = median(f.iter().map(|s| s.p_live).collect()).unwrap_or(1.0);
        let enough = f.len() >= cfg.min_faces;
        let spoof = match (enough, jitter, drift) {
            (true, Some(j), Some(d)) if d <= cfg.still_ratio * j + cfg.still_floor => {
                Some("still".to_owned())
            }
            (true, _, _) if p_live_median < cfg.p_live_window_min => Some("model".to_owned()),
            _ => None,
        };
        TemporalScore {
            faces: f.len() as u32,
            jitter: jitter.unwrap_or(0.0),
            drift: drift.unwrap_or(0.0),
            p_live_median,
            spoof,
        }
    }

    /// Fuse the stream's evidence into one frame's analysis: take the face signature out of
    /// it (it never travels further), add the window's score to its liveness, and turn the
    /// verdict into `spoof` when the window says so and no earlier rule applies. Faces that
    /// failed the quality gate neither enter the window nor are judged by it.
    pub(crate) fn fuse(
        &mut self,
        cfg: &LivenessConfig,
        now_ms: u64,
        analysis: &mut IdentityAnalysis,
    ) {
        let signature = analysis.signature.take();
        let judged = matches!(
            analysis.verdict,
            Verdict::Spoof | Verdict::WrongPerson | Verdict::Phone | Verdict::Ok
        );
        let (Some(signature), Some(liveness), true) = (
            signature.and_then(|s| unpack_signature(&s)),
            analysis.liveness.as_mut(),
            judged,
        ) else {
            return;
        };
        let score = self.observe(cfg, now_ms, signature, liveness.p_live);
        if score.spoof.is_some() {
            liveness.live = false;
            analysis.verdict = Verdict::Spoof;
        }
        liveness.temporal = Some(score);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::LivenessScore;

    /// A unit vector near `base`, moved by `amount` along coordinate `axis`.
    fn sig(base: usize, axis: usize, amount: f32) -> Vec<f32> {
        let mut v = vec![0f32; 128];
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
        mut signature: impl FnMut(usize) -> Vec<f32>,
        p_live: f32,
    ) -> Vec<TemporalScore> {
        let mut s = StreamLiveness::new();
        (0..n)
            .map(|i| s.observe(&cfg(), 1_000 + i as u64 * 200, signature(i), p_live))
            .collect()
    }

    #[test]
    fn the_same_frame_replayed_is_still_once_the_window_fills() {
        let scores = run(20, |_| sig(0, 1, 0.2), 0.9);
        let first = scores.iter().position(|s| s.spoof.is_some()).unwrap();
        // Eight faces at 5 fps span 1.4 s; the ninth brings the first pair 1.5 s apart.
        assert_eq!(first, 8, "{:?}", scores[first]);
        assert!(
            scores[first..]
                .iter()
                .all(|s| s.spoof.as_deref() == Some("still"))
        );
    }

    #[test]
    fn a_still_that_jitters_is_still() {
        // Random-looking jitter of one size, no drift: a photo moved about.
        let scores = run(30, |i| sig(0, 1 + (i * 7) % 5, 0.25), 0.9);
        assert!(
            scores[12..]
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
    fn old_faces_leave_the_window() {
        let mut s = StreamLiveness::new();
        for i in 0..10 {
            s.observe(&cfg(), i * 200, sig(0, 1, 0.0), 0.9);
        }
        // Ten seconds later, one new face: the window holds only it.
        let score = s.observe(&cfg(), 12_000, sig(0, 1, 0.0), 0.9);
        assert_eq!((score.faces, score.spoof), (1, None));
    }

    #[test]
    fn signatures_survive_their_wire_form() {
        let e = sig(3, 9, 0.4);
        let back = unpack_signature(&crate::wire::pack_signature(&e)).unwrap();
        assert!(distance(&e, &back) < 1e-3);
        assert_eq!(unpack_signature(&[0; 128]), None);
        // A signature of any other length (a hostile or foreign result) is ignored.
        assert_eq!(unpack_signature(&[1; 127]), None);
        assert_eq!(unpack_signature(&[1; 4096]), None);
    }

    fn analysis(verdict: Verdict, signature: &[f32]) -> IdentityAnalysis {
        IdentityAnalysis {
            verdict,
            faces: vec![],
            identity: None,
            liveness: Some(LivenessScore {
                p_live: 0.9,
                live: true,
                temporal: None,
            }),
            phone: None,
            models: vec![],
            thresholds: Default::default(),
            quality: None,
            signature: Some(crate::wire::pack_signature(signature).into()),
        }
    }

    #[test]
    fn fuse_turns_ok_into_spoof_strips_the_signature_and_leaves_earlier_rules() {
        let mut s = StreamLiveness::new();
        let mut last = None;
        for i in 0..12u64 {
            let mut a = analysis(Verdict::Ok, &sig(0, 1, 0.1));
            s.fuse(&cfg(), i * 200, &mut a);
            assert!(a.signature.is_none());
            last = Some(a);
        }
        let last = last.unwrap();
        assert_eq!(last.verdict, Verdict::Spoof);
        let l = last.liveness.unwrap();
        assert!(!l.live && l.temporal.unwrap().spoof.as_deref() == Some("still"));
        // A low-quality face is neither judged nor remembered.
        let mut a = analysis(Verdict::LowQuality, &sig(0, 1, 0.1));
        let before = s.faces.len();
        s.fuse(&cfg(), 2_400, &mut a);
        assert_eq!((a.verdict, s.faces.len()), (Verdict::LowQuality, before));
        assert!(a.signature.is_none());
    }
}
