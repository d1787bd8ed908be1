//! Active liveness: a challenge the candidate answers by moving, checked over the landmarks of
//! the frames that follow it. Passive signals (the still test, a presentation-attack model, a
//! face away for long) only raise a suspicion; a challenge decides.
//!
//! Pure and deterministic, like [`crate::policy`]: [`Challenge::observe`] takes one analysed
//! frame's pose and identity with its arrival time and says when a step is done or the
//! challenge passed; [`Challenge::expired`] says when its deadline ran out. The edge session
//! runs one per client; `vigil eval` runs the same code over recorded video.
//!
//! A step (`turn_left`, `turn_right`) is done when, after it was asked for, the frames show in
//! order: the enrolled person facing the camera, the same person turned the asked way, and the
//! enrolled person facing the camera again. Every frame of that motion must hold exactly one
//! face, and each face must be the enrolled person's (a turned face at `turn_match_cosine`, a
//! facing one at the recogniser's own threshold). A turn the other way, a second face or
//! another person's face starts the step over. Frames without a face are skipped: a fast turn
//! can lose the detector for a frame.
//!
//! The yaw is the nose's offset from the eyes' midpoint in eye distances, measured in the
//! aligned face ([`crate::wire::FaceQuality::yaw`]). A photo turned or tilted in the hand is a
//! plane: foreshortening shrinks the nose's offset and the eye distance alike, so the ratio
//! barely moves. Only a head that turns moves the nose against the eyes.

use serde::{Deserialize, Serialize};

pub use crate::domain::StepKind;
use crate::wire::IdentityAnalysis;

/// `[challenge]` in the config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChallengeConfig {
    /// Challenge every session as it starts [VIGIL_CHALLENGE_ON_START].
    pub on_start: bool,
    /// Also challenge at random intervals of about this many ms (uniform between half and one
    /// and a half of it); 0 turns it off [VIGIL_CHALLENGE_EVERY_MS].
    pub every_ms: u64,
    /// Steps per challenge, each drawn at random...
    pub steps: usize,
    /// ...from these kinds.
    pub kinds: Vec<StepKind>,
    /// Time to finish every step, in ms [VIGIL_CHALLENGE_DEADLINE_MS].
    pub deadline_ms: u64,
    /// A face is turned when its yaw, the asked way, is at least this (eye distances)...
    pub turn_yaw: f32,
    /// ...and at least this much further the asked way than where the step's facing frame
    /// was (a photo held a little turned stays where it is).
    pub turn_delta: f32,
    /// A face faces the camera when its yaw is within ±this.
    pub facing_yaw: f32,
    /// A turned face must be at least this similar to the enrolled reference (a turned face
    /// scores lower than a frontal one; a facing face must match at the recogniser's own
    /// threshold).
    pub turn_match_cosine: f32,
    /// After a pass, suspicions are ignored this long, in ms.
    pub grace_ms: u64,
    /// Frames kept per challenge as its evidence (the newest of each kind of moment).
    pub evidence_frames: usize,
}

impl Default for ChallengeConfig {
    /// The yaw levels and the turned-face match are calibrated in `docs/liveness.md` with
    /// `vigil eval`.
    fn default() -> Self {
        Self {
            on_start: true,
            every_ms: 0,
            steps: 2,
            kinds: StepKind::ALL.to_vec(),
            deadline_ms: 12_000,
            turn_yaw: 0.15,
            turn_delta: 0.12,
            facing_yaw: 0.12,
            turn_match_cosine: 0.30,
            grace_ms: 60_000,
            evidence_frames: 6,
        }
    }
}

impl ChallengeConfig {
    /// Every problem at once.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if !(1..=6).contains(&self.steps) {
            errors.push(format!(
                "challenge.steps = {} must be within 1..=6",
                self.steps
            ));
        }
        if self.kinds.is_empty() {
            errors.push("challenge.kinds must name at least one kind".into());
        }
        if self.deadline_ms < 3_000 || self.deadline_ms > 120_000 {
            errors.push(format!(
                "challenge.deadline_ms = {} must be within 3000..=120000",
                self.deadline_ms
            ));
        }
        if self.every_ms != 0 && self.every_ms < 30_000 {
            errors.push(format!(
                "challenge.every_ms = {} must be 0 (off) or at least 30000",
                self.every_ms
            ));
        }
        let ok = |v: f32, lo: f32, hi: f32| v.is_finite() && v >= lo && v <= hi;
        if !ok(self.facing_yaw, 0.01, 1.0) || !ok(self.turn_yaw, 0.01, 2.0) {
            errors.push(
                "challenge.facing_yaw and turn_yaw must be within 0.01..=1 and 0.01..=2".into(),
            );
        } else if self.turn_yaw <= self.facing_yaw {
            errors.push(format!(
                "challenge.turn_yaw = {} must be above facing_yaw = {}",
                self.turn_yaw, self.facing_yaw
            ));
        }
        if !ok(self.turn_delta, 0.01, 2.0) {
            errors.push("challenge.turn_delta must be within 0.01..=2".into());
        }
        if !ok(self.turn_match_cosine, -1.0, 1.0) {
            errors.push("challenge.turn_match_cosine must be within -1..=1".into());
        }
        if !(1..=16).contains(&self.evidence_frames) {
            errors.push("challenge.evidence_frames must be within 1..=16".into());
        }
        errors
    }
}

/// Why a challenge was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Every session starts with one.
    Start,
    /// A passive signal raised a suspicion.
    Suspicion,
    /// An operator asked.
    Operator,
    /// At a random interval.
    Random,
    /// The previous one failed.
    Retry,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Suspicion => "suspicion",
            Trigger::Operator => "operator",
            Trigger::Random => "random",
            Trigger::Retry => "retry",
        }
    }
}

/// What one analysed frame says about the motion: the input of [`Challenge::observe`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pose {
    /// Faces found.
    pub faces: usize,
    /// The largest face's yaw (positive: turned to the candidate's left).
    pub yaw: Option<f32>,
    /// The largest face's similarity to the enrolled reference.
    pub similarity: Option<f32>,
    /// The recogniser's own threshold, as the worker applied it.
    pub match_cosine: f32,
}

impl Pose {
    /// The pose of one frame's analysis.
    pub fn of(a: &IdentityAnalysis) -> Self {
        Self {
            faces: a.faces.len(),
            yaw: a.quality.as_ref().map(|q| q.yaw),
            similarity: a.identity.as_ref().map(|i| i.similarity),
            match_cosine: a.thresholds.get("match_cosine").copied().unwrap_or(1.0),
        }
    }
}

/// Where the current step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    /// Waiting for the enrolled person facing the camera.
    Facing,
    /// Facing seen; waiting for the turn.
    Turn,
    /// Turned; waiting to face the camera again.
    Back,
}

/// A frame the challenge keeps as evidence, by its arrival time and seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moment {
    pub seq: u64,
    pub at_ms: u64,
}

/// What a frame did to the challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nothing changed that the client needs to hear about.
    Nothing,
    /// `done` steps are now complete.
    Step { done: usize },
    /// Every step is done.
    Passed,
}

/// One challenge in progress. Serialisable: it follows the client across reconnects with the
/// policy state, so a reconnect neither escapes nor restarts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Challenge {
    pub id: uuid::Uuid,
    pub steps: Vec<StepKind>,
    pub trigger: Trigger,
    pub issued_at_ms: u64,
    pub deadline_at_ms: u64,
    done: usize,
    phase: Phase,
    /// The frames that moved it on (facing, turned, back), newest last, bounded.
    pub moments: Vec<Moment>,
    /// When a step was last completed (its successor counts only frames after it).
    step_asked_at_ms: u64,
    /// The yaw of the current step's latest facing frame.
    start_yaw: f32,
}

impl Challenge {
    /// A new challenge at `now_ms` with steps drawn by `draw` (called once per step with the
    /// number of kinds, returning an index below it).
    pub fn new(
        cfg: &ChallengeConfig,
        trigger: Trigger,
        now_ms: u64,
        mut draw: impl FnMut(usize) -> usize,
    ) -> Self {
        let kinds = if cfg.kinds.is_empty() {
            &StepKind::ALL[..]
        } else {
            &cfg.kinds[..]
        };
        let steps = (0..cfg.steps)
            .map(|_| kinds[draw(kinds.len()) % kinds.len()])
            .collect();
        Self {
            id: uuid::Uuid::now_v7(),
            steps,
            trigger,
            issued_at_ms: now_ms,
            deadline_at_ms: now_ms + cfg.deadline_ms,
            done: 0,
            phase: Phase::Facing,
            moments: Vec::new(),
            step_asked_at_ms: now_ms,
            start_yaw: 0.0,
        }
    }

    /// Steps complete so far.
    pub fn done(&self) -> usize {
        self.done
    }

    /// True once the deadline passed at `now_ms` without a pass.
    pub fn expired(&self, now_ms: u64) -> bool {
        now_ms >= self.deadline_at_ms && self.done < self.steps.len()
    }

    /// How far the challenge got, for its audit entry and the client.
    pub fn describe(&self) -> String {
        let steps: Vec<&str> = self.steps.iter().map(|s| s.as_str()).collect();
        format!(
            "challenge {} ({}): {} of {} steps done [{}], waiting for {}",
            self.id,
            self.trigger.as_str(),
            self.done,
            self.steps.len(),
            steps.join(", "),
            match self.phase {
                Phase::Facing => "the enrolled person facing the camera",
                Phase::Turn => "the turn",
                Phase::Back => "facing the camera again",
            }
        )
    }

    fn keep(&mut self, cfg: &ChallengeConfig, seq: u64, at_ms: u64) {
        self.moments.push(Moment { seq, at_ms });
        if self.moments.len() > cfg.evidence_frames {
            self.moments.remove(0);
        }
    }

    /// Take one analysed frame (`seq`, arrived at `at_ms`).
    pub fn observe(&mut self, cfg: &ChallengeConfig, pose: Pose, seq: u64, at_ms: u64) -> Progress {
        // A frame from before the step was asked for cannot answer it, nor can one after the
        // deadline or after the last step.
        if at_ms < self.step_asked_at_ms || self.expired(at_ms) || self.done >= self.steps.len() {
            return Progress::Nothing;
        }
        if pose.faces == 0 {
            return Progress::Nothing;
        }
        let (Some(yaw), Some(similarity), 1) = (pose.yaw, pose.similarity, pose.faces) else {
            // Several faces (or a face that could not be measured): the motion must be one
            // person's alone.
            self.phase = Phase::Facing;
            return Progress::Nothing;
        };
        let want = match self.steps[self.done] {
            StepKind::TurnLeft => 1.0,
            StepKind::TurnRight => -1.0,
        };
        let facing = yaw.abs() <= cfg.facing_yaw && similarity >= pose.match_cosine;
        let turned = yaw * want >= cfg.turn_yaw
            && (yaw - self.start_yaw) * want >= cfg.turn_delta
            && similarity >= cfg.turn_match_cosine;
        let wrong_way = -yaw * want >= cfg.turn_yaw;
        if wrong_way {
            self.phase = Phase::Facing;
            return Progress::Nothing;
        }
        if similarity < cfg.turn_match_cosine {
            // A face barely turned yet someone else's starts the step over; a deep turn scores
            // low for the enrolled person too, so it is only skipped (it cannot count).
            if yaw.abs() < cfg.turn_yaw {
                self.phase = Phase::Facing;
            }
            return Progress::Nothing;
        }
        match self.phase {
            Phase::Facing if facing => {
                self.phase = Phase::Turn;
                self.start_yaw = yaw;
                self.keep(cfg, seq, at_ms);
            }
            // Still facing: the turn is measured from the latest facing frame.
            Phase::Turn if facing => self.start_yaw = yaw,
            Phase::Turn | Phase::Back if turned => {
                if self.phase == Phase::Turn {
                    self.keep(cfg, seq, at_ms);
                }
                self.phase = Phase::Back;
            }
            Phase::Back if facing => {
                self.keep(cfg, seq, at_ms);
                self.done += 1;
                // The next step is asked for now; this facing frame is its start.
                self.step_asked_at_ms = at_ms;
                self.start_yaw = yaw;
                self.phase = Phase::Turn;
                return if self.done == self.steps.len() {
                    Progress::Passed
                } else {
                    Progress::Step { done: self.done }
                };
            }
            _ => {}
        }
        Progress::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StepKind::*;

    fn cfg() -> ChallengeConfig {
        ChallengeConfig::default()
    }

    fn pose(yaw: f32, similarity: f32) -> Pose {
        Pose {
            faces: 1,
            yaw: Some(yaw),
            similarity: Some(similarity),
            match_cosine: 0.41,
        }
    }

    fn challenge(steps: &[StepKind]) -> Challenge {
        let mut i = 0;
        let c = ChallengeConfig {
            steps: steps.len(),
            ..cfg()
        };
        let mut c = Challenge::new(&c, Trigger::Start, 1_000, |_| {
            let k = steps[i] as usize;
            i += 1;
            k
        });
        assert_eq!(c.steps, steps);
        c.moments.clear();
        c
    }

    /// Feed poses at 5 fps from `start_ms`; the progress of each.
    fn feed(c: &mut Challenge, start_ms: u64, poses: &[Pose]) -> Vec<Progress> {
        poses
            .iter()
            .enumerate()
            .map(|(i, p)| c.observe(&cfg(), *p, i as u64, start_ms + i as u64 * 200))
            .collect()
    }

    /// A head turning the `sign` way and back: yaw rises to `peak` and returns.
    fn turn(sign: f32, peak: f32) -> Vec<Pose> {
        [0.02, 0.1, 0.5, 1.0, 0.7, 0.3, 0.05]
            .iter()
            .map(|f| pose(sign * peak * f, if *f > 0.6 { 0.42 } else { 0.6 }))
            .collect()
    }

    #[test]
    fn a_head_that_turns_each_way_asked_passes() {
        let mut c = challenge(&[TurnLeft, TurnRight]);
        let mut poses = vec![pose(0.0, 0.7); 3];
        poses.extend(turn(1.0, 0.4));
        poses.extend(turn(-1.0, 0.35));
        let got = feed(&mut c, 1_200, &poses);
        let said: Vec<_> = got
            .into_iter()
            .filter(|p| *p != Progress::Nothing)
            .collect();
        assert_eq!(said, [Progress::Step { done: 1 }, Progress::Passed]);
        assert!(!c.expired(100_000));
        // Facing, turned, back for each step.
        assert_eq!(c.moments.len(), 5);
    }

    #[test]
    fn a_turn_the_other_way_does_not_count_and_starts_the_step_over() {
        let mut c = challenge(&[TurnLeft]);
        let mut poses = turn(-1.0, 0.4);
        assert!(
            feed(&mut c, 1_200, &poses)
                .iter()
                .all(|p| *p == Progress::Nothing)
        );
        // Then the right way: passes.
        poses = turn(1.0, 0.4);
        assert!(feed(&mut c, 5_000, &poses).contains(&Progress::Passed));
    }

    #[test]
    fn frames_from_before_the_ask_do_not_count() {
        let mut c = challenge(&[TurnLeft]);
        // The whole motion arrives before the challenge was issued (a recording running on).
        let got = feed(&mut c, 0, &turn(1.0, 0.4)[..5]);
        assert!(got.iter().all(|p| *p == Progress::Nothing));
        assert_eq!(c.done(), 0);
    }

    #[test]
    fn a_still_or_a_photo_turned_in_the_hand_never_passes_and_expires() {
        let mut c = challenge(&[TurnLeft, TurnRight]);
        // A planar photo rotated in depth keeps its nose where the eyes say: yaw stays near 0.
        let poses: Vec<Pose> = (0..60)
            .map(|i| pose(0.03 * ((i as f32) * 0.7).sin(), 0.8))
            .collect();
        assert!(
            feed(&mut c, 1_200, &poses)
                .iter()
                .all(|p| *p == Progress::Nothing)
        );
        assert!(!c.expired(1_000 + cfg().deadline_ms - 1));
        assert!(c.expired(1_000 + cfg().deadline_ms));
    }

    #[test]
    fn the_turn_is_measured_from_the_latest_facing_frame() {
        let mut c = challenge(&[TurnRight]);
        // Facing a little turned at first, then straight, then the turn: 0.104 from the first
        // facing frame, 0.195 from the latest.
        let poses = [
            pose(-0.078, 0.9),
            pose(-0.018, 0.75),
            pose(0.012, 0.74),
            pose(-0.183, 0.7),
            pose(-0.190, 0.69),
            pose(-0.018, 0.75),
        ];
        assert_eq!(feed(&mut c, 1_200, &poses)[5], Progress::Passed);
    }

    #[test]
    fn a_deep_turn_that_scores_low_is_skipped_not_held_against_the_step() {
        let mut c = challenge(&[TurnLeft]);
        let poses = [
            pose(0.0, 0.8),
            pose(0.3, 0.68),
            pose(0.6, 0.21),
            pose(0.77, 0.29),
            pose(0.3, 0.68),
            pose(0.0, 0.8),
        ];
        assert_eq!(feed(&mut c, 1_200, &poses)[5], Progress::Passed);
    }

    #[test]
    fn a_face_resting_a_little_turned_that_wobbles_does_not_pass() {
        let mut c = challenge(&[TurnRight]);
        // Facing at -0.11, wobbling to -0.17 and back: past turn_yaw, not past turn_delta.
        let poses: Vec<Pose> = (0..40)
            .map(|i| pose(-0.11 - 0.06 * (i % 3) as f32 / 2.0, 0.8))
            .collect();
        assert!(
            feed(&mut c, 1_200, &poses)
                .iter()
                .all(|p| *p == Progress::Nothing)
        );
    }

    #[test]
    fn someone_else_turning_does_not_count() {
        let mut c = challenge(&[TurnRight]);
        let mut poses = vec![pose(0.0, 0.7)];
        // Another person's face (similarity 0.1) does the turn.
        poses.extend(turn(-1.0, 0.4).into_iter().map(|p| Pose {
            similarity: Some(0.1),
            ..p
        }));
        poses.push(pose(0.0, 0.7));
        assert!(
            feed(&mut c, 1_200, &poses)
                .iter()
                .all(|p| *p == Progress::Nothing)
        );
    }

    #[test]
    fn a_second_face_starts_the_step_over() {
        let mut c = challenge(&[TurnLeft]);
        let mut poses = vec![pose(0.0, 0.7), pose(0.2, 0.6), pose(0.4, 0.45)];
        poses.push(Pose {
            faces: 2,
            ..pose(0.4, 0.45)
        });
        poses.push(pose(0.0, 0.7));
        assert!(
            feed(&mut c, 1_200, &poses)
                .iter()
                .all(|p| *p == Progress::Nothing)
        );
        assert_eq!(c.done(), 0);
        // Frames without a face are skipped, not held against the turn.
        let mut c = challenge(&[TurnLeft]);
        let mut poses = vec![pose(0.0, 0.7), pose(0.4, 0.45)];
        poses.push(Pose {
            faces: 0,
            yaw: None,
            similarity: None,
            match_cosine: 0.41,
        });
        poses.push(pose(0.0, 0.7));
        assert_eq!(feed(&mut c, 1_200, &poses)[3], Progress::Passed);
    }

    #[test]
    fn the_facing_frames_must_be_the_enrolled_person_at_the_full_threshold() {
        let mut c = challenge(&[TurnLeft]);
        // Similar enough for a turned face, not for a frontal one.
        let poses: Vec<Pose> = turn(1.0, 0.4)
            .into_iter()
            .map(|p| Pose {
                similarity: Some(0.35),
                ..p
            })
            .collect();
        assert!(
            feed(&mut c, 1_200, &poses)
                .iter()
                .all(|p| *p == Progress::Nothing)
        );
    }

    #[test]
    fn after_the_deadline_nothing_counts_and_it_survives_json() {
        let mut c = challenge(&[TurnLeft]);
        let late = 1_000 + cfg().deadline_ms;
        assert!(
            feed(&mut c, late, &turn(1.0, 0.4))
                .iter()
                .all(|p| *p == Progress::Nothing)
        );
        let back: Challenge = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn defaults_are_valid_and_bad_configs_are_listed() {
        assert!(cfg().validate().is_empty());
        let bad = ChallengeConfig {
            steps: 0,
            deadline_ms: 10,
            turn_yaw: 0.05,
            facing_yaw: 0.1,
            every_ms: 5,
            ..cfg()
        };
        let errors = bad.validate().join("\n");
        for want in ["steps", "deadline_ms", "turn_yaw", "every_ms"] {
            assert!(errors.contains(want), "{errors}");
        }
    }
}
