//! A session's enforcement, as pure state: the client's policy, the frames kept as evidence,
//! and the action events they make. No I/O and no clock; the session tells the client, audits
//! the event and saves the policy state.
//!
//! Evidence is assembled in one place ([`Enforcement::evidence`]):
//! - a policy action carries the kept frames whose verdict fired it (at most
//!   `policy.evidence_frames`, newest last);
//! - a return to `allow` carries the last `ok` frame;
//! - an action forced by an operator carries every kept frame and the last `ok` one.

use std::collections::VecDeque;

use uuid::Uuid;

use crate::domain::{Action, Verdict};
use crate::policy::{ClientPolicy, PolicyConfig, SavedPolicy};
use crate::wire::{ActionEvent, EvidenceFrame};

/// Which kept frames an action carries.
enum Evidence {
    /// The frames with this verdict (for `ok`, the last `ok` frame).
    Of(Verdict),
    /// Every kept frame and the last `ok` one.
    All,
}

#[derive(Debug)]
pub(crate) struct Enforcement {
    policy: ClientPolicy,
    session: u64,
    /// The most recent analysed frames that were not `ok`, newest last.
    kept: VecDeque<EvidenceFrame>,
    last_ok: Option<EvidenceFrame>,
    /// The policy fired since its state was last taken for saving.
    dirty: bool,
}

impl Enforcement {
    pub(crate) fn new(policy: ClientPolicy, session: u64) -> Self {
        Self {
            policy,
            session,
            kept: VecDeque::new(),
            last_ok: None,
            dirty: false,
        }
    }

    /// Run the policy on one verdict at `now_ms`. `frame` is the analysed frame behind it
    /// (`None` for `no_frames`). Returns the action event when the policy fires.
    pub(crate) fn judge(
        &mut self,
        cfg: &PolicyConfig,
        verdict: Verdict,
        frame: Option<EvidenceFrame>,
        now_ms: u64,
    ) -> Option<ActionEvent> {
        match frame {
            Some(frame) if verdict == Verdict::Ok => self.last_ok = Some(frame),
            Some(frame) => {
                self.kept.push_back(frame);
                while self.kept.len() > cfg.evidence_frames {
                    self.kept.pop_front();
                }
            }
            None => {}
        }
        let decision = self.policy.observe(cfg, verdict, now_ms)?;
        self.dirty = true;
        let rule = cfg.rules.get(&decision.reason).map_or_else(
            || format!("{} consecutive ok frames", cfg.ok_to_allow),
            |r| {
                format!(
                    "{} of the last {} frames, step {}, cooldown {} ms",
                    r.k,
                    r.n,
                    decision.step + 1,
                    r.cooldown_ms
                )
            },
        );
        Some(self.event(
            decision.action,
            decision.reason.as_str(),
            rule,
            Evidence::Of(decision.reason),
            None,
            now_ms,
        ))
    }

    /// An action an operator forced at `now_ms`.
    pub(crate) fn force(&self, action: Action, operator: String, now_ms: u64) -> ActionEvent {
        let rule = format!("forced by {operator}");
        self.event(action, "admin", rule, Evidence::All, Some(operator), now_ms)
    }

    /// The policy state to save, when the policy fired since it was last taken.
    pub(crate) fn take_unsaved(&mut self, now_ms: u64) -> Option<SavedPolicy> {
        std::mem::take(&mut self.dirty).then(|| self.policy.save(now_ms))
    }

    fn evidence(&self, which: Evidence) -> Vec<EvidenceFrame> {
        match which {
            Evidence::Of(Verdict::Ok) => self.last_ok.iter().cloned().collect(),
            Evidence::Of(reason) => self
                .kept
                .iter()
                .filter(|f| f.analysis.verdict() == Some(reason))
                .cloned()
                .collect(),
            Evidence::All => self.kept.iter().chain(&self.last_ok).cloned().collect(),
        }
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
            evidence: self.evidence(evidence),
            operator,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Analysis, IdentityAnalysis};
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
                thresholds: Default::default(),
                quality: None,
                signature: None,
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
        // Spoof fires sign-out at its fourth frame; the phone frame between is kept but is
        // not evidence for the spoof.
        let fired = run(&cfg, &mut e, &[Spoof, Phone, Spoof, Spoof, Spoof]);
        let (at, action, reason, seqs) = &fired[0];
        assert_eq!(
            (*at, *action, reason.as_str()),
            (4, Action::SignOut, "spoof")
        );
        assert_eq!(seqs, &vec![0, 2, 3, 4]);
    }

    #[test]
    fn a_return_to_allow_carries_the_last_ok_frame() {
        let cfg = PolicyConfig::default();
        let mut e = Enforcement::new(ClientPolicy::new(), 1);
        let mut verdicts = vec![Spoof; 4];
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
}
