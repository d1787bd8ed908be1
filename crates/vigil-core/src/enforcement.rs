//! A session's enforcement, as pure state: the client's policy, its liveness challenge, the
//! frames kept as evidence, and the events they make. No I/O and no clock; the session tells
//! the client, audits the events and saves the state.
//!
//! Evidence is assembled in one place ([`Enforcement::evidence`]):
//! - a policy action carries the kept frames whose verdict fired it (at most
//!   `policy.evidence_frames`, newest last; for the joint rule, every verdict it counts);
//! - a return to `allow` carries the last `ok` frame;
//! - an action forced by an operator carries every kept frame and the last `ok` one;
//! - a challenge's entries carry the frames that moved it on (passed) or the last frames seen
//!   while it waited (failed).
//!
//! Challenges: a suspicion, the start of a session, an operator or a timer issues one
//! ([`Enforcement::issue`]) unless one is already waiting; analysed frames answer it
//! ([`Enforcement::answer`]); [`Enforcement::tick`] fails it at its deadline. A failure is the
//! `spoof` rule's next step (lock, then sign out); after a lock the return to `allow` is held
//! and a retry is issued at once, and only passing it lifts the lock.

use std::collections::VecDeque;

use uuid::Uuid;

use crate::challenge::{Challenge, ChallengeConfig, Pose, Progress, Trigger};
use crate::domain::{Action, Verdict};
use crate::policy::{ClientPolicy, Decision, PolicyConfig, SavedPolicy};
use crate::wire::client::{ChallengeStep, ServerMsg};
use crate::wire::{ActionEvent, Analysis, ChallengeNote, EvidenceFrame};

/// Which kept frames an action carries.
enum Evidence {
    /// The frames with this verdict (for `ok`, the last `ok` frame).
    Of(Verdict),
    /// The frames with any of the joint rule's verdicts.
    Joint,
    /// Every kept frame and the last `ok` one.
    All,
    /// The challenge's own frames.
    Challenge,
    /// None.
    Nothing,
}

/// What the session must do for the client and the audit trail.
#[derive(Debug)]
pub enum Effect {
    /// Tell the client (a challenge, its progress, its result).
    Tell(ServerMsg),
    /// An action: tell the client and audit it.
    Act(ActionEvent),
    /// An entry for the audit trail only (a challenge issued or passed).
    Audit(ActionEvent),
}

#[derive(Debug)]
pub struct Enforcement {
    policy: ClientPolicy,
    session: u64,
    /// The most recent analysed frames that were not `ok`, newest last.
    kept: VecDeque<EvidenceFrame>,
    last_ok: Option<EvidenceFrame>,
    /// The challenge waiting for an answer, if any.
    challenge: Option<Challenge>,
    /// Why the waiting challenge was issued, as its audit entries say it.
    trigger_detail: String,
    /// The frames that moved the waiting challenge on, and the last frames seen while it
    /// waited (both bounded by `challenge.evidence_frames`).
    moments: Vec<EvidenceFrame>,
    recent: VecDeque<EvidenceFrame>,
    passed_at_ms: Option<u64>,
    /// Frames analysed since the waiting challenge was issued: a deadline that passes with
    /// none (the system could not analyse them) is not the candidate's failure.
    analysed: usize,
    /// The state changed since it was last taken for saving.
    dirty: bool,
}

impl Enforcement {
    pub fn new(policy: ClientPolicy, session: u64) -> Self {
        Self {
            policy,
            session,
            kept: VecDeque::new(),
            last_ok: None,
            challenge: None,
            trigger_detail: String::new(),
            moments: Vec::new(),
            recent: VecDeque::new(),
            passed_at_ms: None,
            analysed: 0,
            dirty: false,
        }
    }

    /// Resume a saved state (policy, waiting challenge, last pass), unless it is older than
    /// `carry_over_ms`.
    pub fn resume(
        cfg: &PolicyConfig,
        saved: Option<SavedPolicy>,
        now_ms: u64,
        session: u64,
    ) -> Self {
        let saved = saved.filter(|s| now_ms.saturating_sub(s.saved_at_ms) <= cfg.carry_over_ms);
        let (challenge, passed_at_ms) = saved
            .as_ref()
            .map(|s| (s.challenge.clone(), s.passed_at_ms))
            .unwrap_or_default();
        let mut e = Self::new(ClientPolicy::resume(cfg, saved, now_ms), session);
        if let Some(c) = &challenge {
            e.trigger_detail = c.trigger.as_str().into();
        }
        e.challenge = challenge;
        e.passed_at_ms = passed_at_ms;
        e
    }

    /// A challenge is waiting for an answer.
    pub fn challenging(&self) -> bool {
        self.challenge.is_some()
    }

    /// The client was signed out, and not re-admitted since (a re-admission saves a fresh
    /// state).
    pub fn signed_out(&self) -> bool {
        self.policy.state() == Action::SignOut
    }

    /// Move the waiting challenge's deadline on by `ms` (the time the client was paused: a
    /// paused client sends nothing to answer with).
    pub fn postpone(&mut self, ms: u64) {
        if let Some(c) = self.challenge.as_mut() {
            c.deadline_at_ms = c.deadline_at_ms.saturating_add(ms);
            self.dirty = true;
        }
    }

    /// Mark the state for saving, so that its age counts from now (a session that ends).
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// Run the policy on one verdict at `now_ms`. `frame` is the analysed frame behind it
    /// (`None` for `no_frames` and `invalid_frame`). Returns the action event when the policy
    /// fires.
    pub fn judge(
        &mut self,
        cfg: &PolicyConfig,
        verdict: Verdict,
        frame: Option<EvidenceFrame>,
        now_ms: u64,
    ) -> Option<ActionEvent> {
        match frame {
            // Only a fully analysed frame may stand as evidence of a return to `allow`.
            Some(frame) if verdict == Verdict::Ok && fully_analysed(&frame) => {
                self.last_ok = Some(frame)
            }
            Some(_) if verdict == Verdict::Ok => {}
            Some(frame) => {
                self.kept.push_back(frame);
                while self.kept.len() > cfg.evidence_frames {
                    self.kept.pop_front();
                }
            }
            None => {}
        }
        let decision = self.policy.observe(cfg, verdict, now_ms)?;
        Some(self.decided(cfg, decision, None, now_ms))
    }

    /// The event for a policy decision.
    fn decided(
        &mut self,
        cfg: &PolicyConfig,
        d: Decision,
        challenge: Option<(ChallengeNote, String)>,
        now_ms: u64,
    ) -> ActionEvent {
        self.dirty = true;
        let rule =
            if d.joint {
                cfg.not_ok.as_ref().map_or_else(String::new, |j| {
                format!(
                    "not_ok: {} of the last {} frames were any of [{}], step {}, cooldown {} ms",
                    j.rule.k,
                    j.rule.n,
                    j.verdicts.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", "),
                    d.step + 1,
                    j.rule.cooldown_ms
                )
            })
            } else {
                cfg.rules.get(&d.reason).map_or_else(
                    || format!("{} consecutive ok frames", cfg.ok_to_allow),
                    |r| {
                        format!(
                            "{} of the last {} frames, step {}, cooldown {} ms",
                            r.k,
                            r.n,
                            d.step + 1,
                            r.cooldown_ms
                        )
                    },
                )
            };
        let (reason, evidence) = if d.joint {
            ("not_ok".to_owned(), Evidence::Joint)
        } else {
            (d.reason.as_str().to_owned(), Evidence::Of(d.reason))
        };
        match challenge {
            Some((note, why)) => {
                let rule = format!("{why}; {rule}");
                let mut ev = self.event(d.action, &reason, rule, Evidence::Challenge, None, now_ms);
                ev.challenge = Some(note);
                ev
            }
            None => self.event_with(d.action, &reason, rule, evidence, cfg, now_ms),
        }
    }

    /// An action an operator forced at `now_ms`. A forced `allow` is the operator's word on
    /// liveness too: it lifts a held lock and drops the waiting challenge.
    pub fn force(&mut self, action: Action, operator: String, now_ms: u64) -> ActionEvent {
        if action == Action::Allow {
            self.policy.release();
            self.policy.forgive(Verdict::Spoof);
            self.challenge = None;
            self.dirty = true;
        }
        let rule = format!("forced by {operator}");
        self.event(action, "admin", rule, Evidence::All, Some(operator), now_ms)
    }

    /// Issue a challenge at `now_ms` for `trigger` (`detail` says more, such as the signal of
    /// a suspicion), unless one is already waiting, or a suspicion comes within the grace
    /// period of a pass. `draw(n)` picks each step.
    pub fn issue(
        &mut self,
        cfg: &ChallengeConfig,
        trigger: Trigger,
        detail: Option<&str>,
        now_ms: u64,
        draw: impl FnMut(usize) -> usize,
    ) -> Vec<Effect> {
        if self.challenge.is_some() {
            return Vec::new();
        }
        if trigger == Trigger::Suspicion
            && self
                .passed_at_ms
                .is_some_and(|at| now_ms < at + cfg.grace_ms)
        {
            return Vec::new();
        }
        let c = Challenge::new(cfg, trigger, now_ms, draw);
        self.trigger_detail = match detail {
            Some(d) => format!("{}:{d}", trigger.as_str()),
            None => trigger.as_str().to_owned(),
        };
        self.moments.clear();
        self.recent.clear();
        self.analysed = 0;
        self.challenge = Some(c);
        self.dirty = true;
        let tell = self.tell(now_ms).expect("a challenge was just issued");
        let entry = self.challenge_entry("issued", "challenge_issued", Evidence::Nothing, now_ms);
        vec![Effect::Tell(tell), Effect::Audit(entry)]
    }

    /// The waiting challenge as the client is told it at `now_ms` (again after a reconnect,
    /// with the time left).
    pub fn tell(&self, now_ms: u64) -> Option<ServerMsg> {
        let c = self.challenge.as_ref()?;
        Some(ServerMsg::Challenge {
            id: c.id.to_string(),
            steps: c.steps.iter().map(|k| ChallengeStep { kind: *k }).collect(),
            deadline_ms: c.deadline_at_ms.saturating_sub(now_ms),
            reason: c.trigger.as_str().into(),
        })
    }

    /// One analysed frame, arrived at `at_ms`, as an answer to the waiting challenge.
    pub fn answer(
        &mut self,
        cfg: &ChallengeConfig,
        frame: &EvidenceFrame,
        now_ms: u64,
    ) -> Vec<Effect> {
        let Some(c) = self.challenge.as_mut() else {
            return Vec::new();
        };
        let Analysis::Identity(a) = &frame.analysis else {
            return Vec::new();
        };
        // A frame published before the challenge may have carried its identity over: it is
        // neither an answer nor evidence.
        if !identity_judged(frame) {
            return Vec::new();
        }
        self.recent.push_back(frame.clone());
        while self.recent.len() > cfg.evidence_frames {
            self.recent.pop_front();
        }
        self.analysed += 1;
        let before = c.moments.len();
        let progress = c.observe(cfg, Pose::of(a), frame.seq, frame.received_at_ms);
        if c.moments.len() != before || progress != Progress::Nothing {
            self.moments.push(frame.clone());
            if self.moments.len() > cfg.evidence_frames {
                self.moments.remove(0);
            }
        }
        let id = c.id.to_string();
        match progress {
            Progress::Nothing => Vec::new(),
            Progress::Step { done } => {
                self.dirty = true;
                vec![Effect::Tell(ServerMsg::ChallengeProgress { id, done })]
            }
            Progress::Passed => {
                let mut out = vec![Effect::Tell(ServerMsg::ChallengeResult {
                    id,
                    passed: true,
                    reason: "passed".into(),
                })];
                let entry =
                    self.challenge_entry("passed", "challenge_passed", Evidence::Challenge, now_ms);
                out.push(Effect::Audit(entry));
                self.challenge = None;
                self.passed_at_ms = Some(now_ms);
                // A pass forgives the failures before it: only failures in a row escalate.
                self.policy.forgive(Verdict::Spoof);
                self.dirty = true;
                if self.policy.held()
                    && let Some(d) = self.policy.release()
                {
                    let mut ev = self.event(
                        d.action,
                        "challenge",
                        "a liveness challenge passed".into(),
                        Evidence::Challenge,
                        None,
                        now_ms,
                    );
                    ev.origin = "policy".into();
                    out.push(Effect::Act(ev));
                }
                out
            }
        }
    }

    /// At `now_ms`: a challenge past its deadline fails, which is the `spoof` rule's next step;
    /// unless that signed the client out, a retry is issued at once and the lock holds until
    /// it is passed.
    pub fn tick(
        &mut self,
        pcfg: &PolicyConfig,
        cfg: &ChallengeConfig,
        now_ms: u64,
        draw: impl FnMut(usize) -> usize,
    ) -> Vec<Effect> {
        let Some(c) = self.challenge.as_ref().filter(|c| c.expired(now_ms)) else {
            return Vec::new();
        };
        if self.analysed == 0 {
            // Not one frame could be analysed while it waited (the system was down, or the
            // client sent nothing usable, which the `no_frames` and `invalid_frame` rules
            // judge): not the candidate's failure. It is issued again.
            let trigger = c.trigger;
            let mut out = vec![Effect::Tell(ServerMsg::ChallengeResult {
                id: c.id.to_string(),
                passed: false,
                reason: "no_frames_analysed".into(),
            })];
            self.challenge = None;
            out.extend(self.issue(cfg, trigger, Some("again"), now_ms, draw));
            return out;
        }
        let why = format!("failed: timeout, {}", c.describe());
        let mut out = vec![Effect::Tell(ServerMsg::ChallengeResult {
            id: c.id.to_string(),
            passed: false,
            reason: "timeout".into(),
        })];
        let note = self.note("failed", why.clone());
        // The evidence of a failure: what the camera showed while the challenge waited.
        self.moments = self.recent.iter().cloned().collect();
        match self.policy.fire(pcfg, Verdict::Spoof, now_ms) {
            Some(d) => {
                let ev = self.decided(pcfg, d, Some((note, why)), now_ms);
                let signed_out = ev.action == Action::SignOut;
                out.push(Effect::Act(ev));
                self.challenge = None;
                if !signed_out {
                    self.policy.hold();
                    out.extend(self.issue(cfg, Trigger::Retry, None, now_ms, draw));
                }
            }
            None => {
                // No `spoof` rule configured: the failure is recorded, nothing is enforced.
                let mut ev = self.event(
                    self.policy.state(),
                    "challenge_failed",
                    why,
                    Evidence::Challenge,
                    None,
                    now_ms,
                );
                ev.origin = "challenge".into();
                ev.challenge = Some(note);
                out.push(Effect::Audit(ev));
                self.challenge = None;
            }
        }
        self.dirty = true;
        out
    }

    fn note(&self, outcome: &str, detail: String) -> ChallengeNote {
        let c = self.challenge.as_ref().expect("a challenge is waiting");
        ChallengeNote {
            id: c.id,
            trigger: self.trigger_detail.clone(),
            steps: c.steps.clone(),
            outcome: outcome.into(),
            detail,
        }
    }

    /// An audit entry that records the waiting challenge (it acts on nothing: its `action`
    /// is the action in force).
    fn challenge_entry(
        &self,
        outcome: &str,
        reason: &str,
        evidence: Evidence,
        now_ms: u64,
    ) -> ActionEvent {
        let detail = self
            .challenge
            .as_ref()
            .map(|c| c.describe())
            .unwrap_or_default();
        let note = self.note(outcome, detail.clone());
        let mut ev = self.event(self.policy.state(), reason, detail, evidence, None, now_ms);
        ev.origin = "challenge".into();
        ev.challenge = Some(note);
        ev
    }

    /// The state to save, when it changed since it was last taken.
    pub fn take_unsaved(&mut self, now_ms: u64) -> Option<SavedPolicy> {
        std::mem::take(&mut self.dirty).then(|| {
            let mut saved = self.policy.save(now_ms);
            saved.challenge = self.challenge.clone();
            saved.passed_at_ms = self.passed_at_ms;
            saved
        })
    }

    fn evidence(&self, which: Evidence, cfg: Option<&PolicyConfig>) -> Vec<EvidenceFrame> {
        match which {
            Evidence::Of(Verdict::Ok) => self.last_ok.iter().cloned().collect(),
            Evidence::Of(reason) => self
                .kept
                .iter()
                .filter(|f| f.analysis.verdict() == Some(reason))
                .cloned()
                .collect(),
            Evidence::Joint => {
                let counted = cfg.and_then(|c| c.not_ok.as_ref());
                self.kept
                    .iter()
                    .filter(|f| {
                        counted.is_some_and(|j| {
                            f.analysis
                                .verdict()
                                .is_some_and(|v| j.verdicts.contains(&v))
                        })
                    })
                    .cloned()
                    .collect()
            }
            Evidence::All => self.kept.iter().chain(&self.last_ok).cloned().collect(),
            Evidence::Challenge => self.moments.clone(),
            Evidence::Nothing => Vec::new(),
        }
    }

    fn event_with(
        &self,
        action: Action,
        reason: &str,
        rule: String,
        evidence: Evidence,
        cfg: &PolicyConfig,
        now_ms: u64,
    ) -> ActionEvent {
        let mut ev = self.event(action, reason, rule, Evidence::Nothing, None, now_ms);
        ev.evidence = self.evidence(evidence, Some(cfg));
        ev
    }

    fn event(
        &self,
        action: Action,
        reason: &str,
        rule: String,
        evidence: Evidence,
        operator: Option<String>,
        now_ms: u64,
    ) -> ActionEvent {
        ActionEvent {
            action_id: Uuid::now_v7(),
            evidence_id: Uuid::now_v7(),
            action,
            reason: reason.into(),
            origin: if operator.is_some() {
                "admin"
            } else {
                "policy"
            }
            .into(),
            session: self.session,
            decided_at_ms: now_ms,
            rule,
            evidence: self.evidence(evidence, None),
            operator,
            challenge: None,
        }
    }
}

/// Whether the recogniser and the liveness models ran on the frame (the phone detector may
/// have been off its cadence).
fn identity_judged(frame: &EvidenceFrame) -> bool {
    match &frame.analysis {
        crate::wire::Analysis::Identity(a) => a.carried.is_empty(),
        _ => true,
    }
}

/// Whether every model of the stack ran on the frame (none skipped off its cadence, none
/// carried over from the face track).
fn fully_analysed(frame: &EvidenceFrame) -> bool {
    match &frame.analysis {
        crate::wire::Analysis::Identity(a) => a.skipped.is_empty() && a.carried.is_empty(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::IdentityAnalysis;
    use Verdict::*;

    fn frame(seq: u64, verdict: Verdict) -> EvidenceFrame {
        EvidenceFrame {
            seq,
            frame_id: Uuid::now_v7(),
            received_at_ms: seq * 200,
            jpeg: bytes::Bytes::from_static(b"jpeg"),
            analysis: Analysis::Identity(IdentityAnalysis {
                verdict,
                faces: vec![],
                identity: None,
                liveness: None,
                phone: None,
                models: vec![],
                skipped: Vec::new(),
                carried: Vec::new(),
                thresholds: Default::default(),
                quality: None,
                appearance: None,
                track: None,
            }),
        }
    }

    /// What fired, as (frame index, action, reason, evidence seqs).
    type Fired = Vec<(usize, Action, String, Vec<u64>)>;

    /// Feed verdicts at 5 frames per second, each with its frame (`NoFrames` without one);
    /// collect what fires.
    fn run(cfg: &PolicyConfig, e: &mut Enforcement, verdicts: &[Verdict]) -> Fired {
        verdicts
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let f = (*v != NoFrames).then(|| frame(i as u64, *v));
                e.judge(cfg, *v, f, i as u64 * 200).map(|ev| {
                    let seqs = ev.evidence.iter().map(|f| f.seq).collect();
                    (i, ev.action, ev.reason, seqs)
                })
            })
            .collect()
    }

    #[test]
    fn an_action_carries_the_frames_that_fired_it_newest_last() {
        let cfg = PolicyConfig::default();
        let mut e = Enforcement::new(ClientPolicy::new(), 7);
        // Ok frames, then the wrong person: the lock carries only wrong-person frames, at
        // most evidence_frames of them.
        let mut verdicts = vec![Ok; 3];
        verdicts.extend([WrongPerson; 5]);
        let fired = run(&cfg, &mut e, &verdicts);
        assert_eq!(fired.len(), 1);
        let (at, action, reason, seqs) = &fired[0];
        assert_eq!(
            (*at, *action, reason.as_str()),
            (7, Action::LockScreen, "wrong_person")
        );
        assert_eq!(
            seqs,
            &vec![5, 6, 7],
            "the newest {} frames",
            cfg.evidence_frames
        );
    }

    #[test]
    fn frames_of_another_verdict_are_not_evidence() {
        let cfg = PolicyConfig {
            evidence_frames: 5,
            ..PolicyConfig::default()
        };
        let mut e = Enforcement::new(ClientPolicy::new(), 1);
        // A phone fires sign-out at its fourth frame; the face-less frame between is kept but
        // is not evidence for the phone.
        let fired = run(&cfg, &mut e, &[Phone, NoFace, Phone, Phone, Phone]);
        let (at, action, reason, seqs) = &fired[0];
        assert_eq!(
            (*at, *action, reason.as_str()),
            (4, Action::SignOut, "phone")
        );
        assert_eq!(seqs, &vec![0, 2, 3, 4]);
    }

    #[test]
    fn a_return_to_allow_carries_the_last_ok_frame() {
        let cfg = PolicyConfig::default();
        let mut e = Enforcement::new(ClientPolicy::new(), 1);
        let mut verdicts = vec![Phone; 4];
        verdicts.extend([Ok; 10]);
        let fired = run(&cfg, &mut e, &verdicts);
        let allow = fired.iter().find(|f| f.1 == Action::Allow).unwrap();
        assert_eq!((allow.0, allow.2.as_str()), (8, "ok"));
        assert_eq!(
            allow.3,
            vec![allow.0 as u64],
            "the ok frame that completed the streak"
        );
    }

    #[test]
    fn a_frame_that_skipped_the_phone_detector_is_no_ok_evidence() {
        let cfg = PolicyConfig::default();
        let mut e = Enforcement::new(ClientPolicy::new(), 1);
        for (i, v) in [Phone; 4].iter().enumerate() {
            e.judge(&cfg, *v, Some(frame(i as u64, *v)), i as u64 * 200);
        }
        // `ok` frames 4 to 13; only 6 ran every model, the others skipped the phone detector.
        let mut allow = None;
        for seq in 4..14u64 {
            let mut f = frame(seq, Ok);
            if seq != 6
                && let Analysis::Identity(a) = &mut f.analysis
            {
                a.skipped = vec!["cocossd:x".into()];
            }
            if let Some(ev) = e.judge(&cfg, Ok, Some(f), seq * 200)
                && ev.action == Action::Allow
            {
                allow = Some(ev);
            }
        }
        let allow = allow.expect("the streak of ok frames returns to allow");
        let seqs: Vec<u64> = allow.evidence.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, vec![6], "the newest fully analysed ok frame");
    }

    #[test]
    fn silence_fires_with_no_frame_as_evidence() {
        let cfg = PolicyConfig::default();
        let mut e = Enforcement::new(ClientPolicy::new(), 1);
        let fired = run(&cfg, &mut e, &[Ok, NoFrames, NoFrames, NoFrames]);
        assert!(!fired.is_empty(), "no_frames has a rule that acts");
        assert!(fired.iter().all(|f| f.2 == "no_frames" && f.3.is_empty()));
    }

    #[test]
    fn a_forced_action_carries_everything_kept_and_names_its_operator() {
        let cfg = PolicyConfig::default();
        let mut e = Enforcement::new(ClientPolicy::new(), 9);
        run(&cfg, &mut e, &[Ok, Phone, Ok, NoFace]);
        let ev = e.force(Action::SignOut, "alice".into(), 5_000);
        assert_eq!(ev.action, Action::SignOut);
        assert_eq!((ev.reason.as_str(), ev.origin.as_str()), ("admin", "admin"));
        assert_eq!(ev.rule, "forced by alice");
        assert_eq!(ev.operator.as_deref(), Some("alice"));
        assert_eq!((ev.session, ev.decided_at_ms), (9, 5_000));
        let seqs: Vec<u64> = ev.evidence.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, vec![1, 3, 2], "kept frames, then the last ok one");
        // Forcing leaves the policy's state alone: nothing to save.
        assert!(e.take_unsaved(5_000).is_none());
    }

    #[test]
    fn the_state_is_saved_once_after_each_firing_and_resumes_mid_escalation() {
        let cfg = PolicyConfig::default();
        let mut e = Enforcement::new(ClientPolicy::new(), 1);
        assert!(e.take_unsaved(0).is_none());
        // Multiple faces for 5 s: a warning, then a lock (its escalation ladder).
        let first = run(&cfg, &mut e, &[MultipleFaces; 25]);
        assert_eq!(first[0].1, Action::Warn);
        let saved = e.take_unsaved(5_000).expect("fired, so unsaved");
        assert!(e.take_unsaved(5_000).is_none(), "taken once");
        // A new session resumes it: the next firing continues the ladder instead of warning.
        let mut again = Enforcement::new(ClientPolicy::resume(&cfg, Some(saved), 5_000), 2);
        let later: Vec<Verdict> = vec![MultipleFaces; 100];
        let fired: Vec<Action> = later
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let now = 60_000 + i as u64 * 200;
                again.judge(&cfg, *v, Some(frame(i as u64, *v)), now)
            })
            .map(|ev| ev.action)
            .collect();
        let fresh: Vec<Action> = run(&cfg, &mut Enforcement::new(ClientPolicy::new(), 3), &later)
            .iter()
            .map(|f| f.1)
            .collect();
        assert_eq!(fresh[0], Action::Warn);
        assert_ne!(
            fired.first(),
            Some(&Action::Warn),
            "resumed past the warning: {fired:?}"
        );
    }

    fn posed(seq: u64, at_ms: u64, yaw: f32, similarity: f32) -> EvidenceFrame {
        let mut f = frame(seq, Ok);
        f.received_at_ms = at_ms;
        if let Analysis::Identity(a) = &mut f.analysis {
            a.faces = vec![crate::wire::FaceBox {
                x: 0.0,
                y: 0.0,
                w: 100.0,
                h: 100.0,
                score: 0.9,
            }];
            a.quality = Some(crate::wire::FaceQuality {
                face_px: 100.0,
                sharpness: 100.0,
                brightness: 100.0,
                yaw,
                pitch: 0.5,
                failed: None,
            });
            a.identity = Some(crate::wire::IdentityScore {
                similarity,
                matched: similarity >= 0.41,
            });
            a.thresholds.insert("match_cosine".into(), 0.41);
        }
        f
    }

    fn acts(effects: &[Effect]) -> Vec<(Action, String)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Act(ev) => Some((ev.action, ev.reason.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_unanswered_challenge_locks_then_retries_then_signs_out() {
        let (pcfg, ccfg) = (PolicyConfig::default(), ChallengeConfig::default());
        let mut e = Enforcement::new(ClientPolicy::new(), 1);
        let issued = e.issue(&ccfg, Trigger::Start, None, 0, |_| 0);
        assert!(matches!(
            &issued[0],
            Effect::Tell(ServerMsg::Challenge {
                deadline_ms: 12_000,
                ..
            })
        ));
        assert!(matches!(&issued[1], Effect::Audit(ev) if ev.reason == "challenge_issued"));
        // A second one is not issued while it waits.
        assert!(
            e.issue(&ccfg, Trigger::Suspicion, Some("still"), 10, |_| 0)
                .is_empty()
        );
        assert!(e.tick(&pcfg, &ccfg, 11_999, |_| 0).is_empty());
        let failed = fail(&mut e, &pcfg, &ccfg, 12_000);
        assert_eq!(acts(&failed), [(Action::LockScreen, "spoof".to_owned())]);
        assert!(failed.iter().any(
            |e| matches!(e, Effect::Tell(ServerMsg::Challenge { reason, .. }) if reason == "retry")
        ));
        // Ok frames do not lift the lock while the retry waits...
        for i in 0..10 {
            assert!(
                e.judge(&pcfg, Ok, Some(frame(i, Ok)), 12_100 + i * 200)
                    .is_none()
            );
        }
        // ...and the retry's timeout signs out, with no further retry.
        let out = fail(&mut e, &pcfg, &ccfg, 24_000);
        assert_eq!(acts(&out), [(Action::SignOut, "spoof".to_owned())]);
        assert!(!e.challenging());
    }

    #[test]
    fn a_frame_that_carried_its_identity_is_neither_an_answer_nor_evidence() {
        let ccfg = ChallengeConfig::default();
        let mut e = Enforcement::new(ClientPolicy::new(), 1);
        e.issue(&ccfg, Trigger::Start, None, 0, |_| 0);
        // Two left turns, every frame carried over from the track: nothing moves.
        let yaws = [0.0, 0.3, 0.0, 0.3, 0.0];
        for (i, yaw) in yaws.iter().enumerate() {
            let mut f = posed(i as u64, 100 + i as u64 * 200, *yaw, 0.8);
            if let Analysis::Identity(a) = &mut f.analysis {
                a.carried = vec!["sface:2021dec".into()];
            }
            assert!(e.answer(&ccfg, &f, 100 + i as u64 * 200).is_empty());
        }
        assert!(e.recent.is_empty(), "no evidence from carried frames");
        assert!(e.challenging());
        // The same frames fully analysed pass it.
        let mut effects = Vec::new();
        for (i, yaw) in yaws.iter().enumerate() {
            let f = posed(10 + i as u64, 1_100 + i as u64 * 200, *yaw, 0.8);
            effects.extend(e.answer(&ccfg, &f, 1_100 + i as u64 * 200));
        }
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Audit(ev) if ev.reason == "challenge_passed"))
        );
        assert!(!e.challenging());
    }

    #[test]
    fn passing_the_retry_lifts_the_lock_and_the_challenge_follows_a_reconnect() {
        let (pcfg, ccfg) = (PolicyConfig::default(), ChallengeConfig::default());
        let mut e = Enforcement::new(ClientPolicy::new(), 1);
        e.issue(&ccfg, Trigger::Start, None, 0, |_| 0);
        fail(&mut e, &pcfg, &ccfg, 12_000);
        // A reconnect: the next session resumes the waiting retry and its deadline.
        let saved = e.take_unsaved(12_500).expect("changed");
        let mut e = Enforcement::resume(&pcfg, Some(saved), 13_000, 2);
        assert!(matches!(
            e.tell(13_000),
            Some(ServerMsg::Challenge {
                deadline_ms: 11_000,
                ..
            })
        ));
        // Two left turns (step kind 0), each from facing and back.
        let mut effects = Vec::new();
        let yaws = [0.0, 0.3, 0.0, 0.3, 0.0];
        for (i, yaw) in yaws.iter().enumerate() {
            let f = posed(i as u64, 13_100 + i as u64 * 200, *yaw, 0.8);
            effects.extend(e.answer(&ccfg, &f, 13_100 + i as u64 * 200));
        }
        assert_eq!(acts(&effects), [(Action::Allow, "challenge".to_owned())]);
        assert!(effects.iter().any(|e| matches!(e, Effect::Audit(ev) if ev.reason == "challenge_passed" && !ev.evidence.is_empty())));
        // Within the grace period a suspicion asks nothing.
        assert!(
            e.issue(&ccfg, Trigger::Suspicion, Some("still"), 20_000, |_| 0)
                .is_empty()
        );
        assert!(
            !e.issue(
                &ccfg,
                Trigger::Suspicion,
                Some("still"),
                14_000 + ccfg.grace_ms,
                |_| 0
            )
            .is_empty()
        );
    }

    /// Fail a waiting challenge at `at_ms`, after one analysed frame.
    fn fail(
        e: &mut Enforcement,
        pcfg: &PolicyConfig,
        ccfg: &ChallengeConfig,
        at_ms: u64,
    ) -> Vec<Effect> {
        e.answer(ccfg, &posed(0, at_ms - 1, 0.0, 0.8), at_ms - 1);
        e.tick(pcfg, ccfg, at_ms, |_| 0)
    }

    /// Pass a waiting left-left challenge from `at_ms`.
    fn pass(e: &mut Enforcement, ccfg: &ChallengeConfig, at_ms: u64) -> Vec<Effect> {
        [0.0, 0.3, 0.0, 0.3, 0.0]
            .iter()
            .enumerate()
            .flat_map(|(i, yaw)| {
                let t = at_ms + i as u64 * 200;
                e.answer(ccfg, &posed(i as u64, t, *yaw, 0.8), t)
            })
            .collect()
    }

    #[test]
    fn a_pass_forgives_the_failure_before_it() {
        let (pcfg, ccfg) = (PolicyConfig::default(), ChallengeConfig::default());
        let mut e = Enforcement::new(ClientPolicy::new(), 1);
        e.issue(&ccfg, Trigger::Start, None, 0, |_| 0);
        assert_eq!(
            acts(&fail(&mut e, &pcfg, &ccfg, 12_000))[0].0,
            Action::LockScreen
        );
        assert_eq!(acts(&pass(&mut e, &ccfg, 12_100))[0].0, Action::Allow);
        // A later miss locks again (and retries); it does not sign out.
        e.issue(&ccfg, Trigger::Operator, None, 100_000, |_| 0);
        let again = fail(&mut e, &pcfg, &ccfg, 112_000);
        assert_eq!(acts(&again), [(Action::LockScreen, "spoof".to_owned())]);
    }

    #[test]
    fn a_deadline_with_no_frame_analysed_is_not_a_failure() {
        let (pcfg, ccfg) = (PolicyConfig::default(), ChallengeConfig::default());
        let mut e = Enforcement::new(ClientPolicy::new(), 1);
        e.issue(&ccfg, Trigger::Start, None, 0, |_| 0);
        let out = e.tick(&pcfg, &ccfg, 12_000, |_| 0);
        assert!(
            acts(&out).is_empty(),
            "the system analysed nothing: no spoof"
        );
        assert!(out.iter().any(|e| matches!(e, Effect::Tell(ServerMsg::ChallengeResult { reason, .. }) if reason == "no_frames_analysed")));
        assert!(e.challenging(), "issued again");
        assert!(matches!(
            e.tell(12_000),
            Some(ServerMsg::Challenge {
                deadline_ms: 12_000,
                ..
            })
        ));
    }

    #[test]
    fn a_forced_allow_lifts_a_held_lock_and_drops_the_challenge_and_pause_stops_the_clock() {
        let (pcfg, ccfg) = (PolicyConfig::default(), ChallengeConfig::default());
        let mut e = Enforcement::new(ClientPolicy::new(), 1);
        e.issue(&ccfg, Trigger::Start, None, 0, |_| 0);
        fail(&mut e, &pcfg, &ccfg, 12_000);
        assert!(e.challenging(), "a retry waits");
        e.force(Action::Allow, "alice".into(), 13_000);
        assert!(!e.challenging());
        assert!(e.tick(&pcfg, &ccfg, 30_000, |_| 0).is_empty());
        // Paused for 20 s: the deadline moves on by as much.
        e.issue(&ccfg, Trigger::Operator, None, 40_000, |_| 0);
        e.postpone(20_000);
        assert!(
            !e.challenging()
                || !e
                    .tick(&pcfg, &ccfg, 52_000, |_| 0)
                    .iter()
                    .any(|x| matches!(x, Effect::Act(_)))
        );
        assert!(matches!(
            e.tell(52_000),
            Some(ServerMsg::Challenge {
                deadline_ms: 20_000,
                ..
            })
        ));
    }
}
