//! The action policy: turns a client's stream of per-frame verdicts into enforced actions.
//!
//! Pure and deterministic: [`ClientPolicy::observe`] takes a verdict and the time, and says
//! whether an action fires. A rule fires when `k` of the last `n` frames share its verdict and
//! the rule is not cooling down; each firing of a rule takes the next step of its escalation
//! (for example warn, then lock_screen). The joint `not_ok` rule counts any mix of the verdicts
//! it names, so alternating one violation with another (or with blank frames) is still caught.
//! `ok_to_allow` consecutive `ok` frames bring the client back to `allow`, unless the return is
//! held (a failed liveness challenge is lifted only by passing the next one).
//! [`ClientPolicy::fire`] takes a rule's next step directly: a failed challenge is the `spoof`
//! rule's step. The edge session runs one per client, where results arrive in order.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

pub use crate::domain::Action;
use crate::domain::Verdict;

/// One verdict's rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Frames with this verdict needed...
    pub k: usize,
    /// ...among the last `n` frames.
    pub n: usize,
    /// The action of the first firing, then of each repeated firing (the last one repeats).
    pub steps: Vec<Action>,
    /// After firing, the rule stays quiet this long, in ms.
    pub cooldown_ms: u64,
}

/// The policy's configuration (`[policy]` in the config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Consecutive `ok` frames that bring the client back to `allow`.
    pub ok_to_allow: usize,
    /// Frames kept per client as evidence for an action.
    pub evidence_frames: usize,
    /// A client that sends no frame for this long gets a `no_frames` verdict, and again after
    /// each further such period, in ms; 0 turns it off [VIGIL_POLICY_NO_FRAMES_MS].
    pub no_frames_ms: u64,
    /// A client's policy state (escalation, cooldowns, recent verdicts) is kept in the
    /// directory, so reconnecting to this or another edge resumes it; state older than this is
    /// forgotten, in ms [VIGIL_POLICY_CARRY_OVER_MS].
    pub carry_over_ms: u64,
    pub rules: BTreeMap<Verdict, Rule>,
    /// The joint rule: `k` of the last `n` frames had any of `verdicts` (`[policy.not_ok]`).
    pub not_ok: Option<JointRule>,
    /// After `sign_out` the edge ends the session, and the client cannot start another until
    /// an operator re-admits it [VIGIL_POLICY_SIGN_OUT_ENDS_SESSION].
    pub sign_out_ends_session: bool,
}

/// A rule over several verdicts at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JointRule {
    pub verdicts: Vec<Verdict>,
    #[serde(flatten)]
    pub rule: Rule,
}

impl Default for PolicyConfig {
    /// No face and the wrong person lock the screen, a phone signs out, several faces warn and
    /// then lock, any mix of those locks, frames that are not images warn and then lock. A
    /// `spoof` comes only from a failed liveness challenge (passive signals never act): the
    /// first locks, the next signs out. Every frame rule's `k` is above half of its `n`, so a
    /// verdict that merely alternates with `ok` never fires.
    fn default() -> Self {
        let rule = |k, n, steps: &[Action], cooldown_ms| Rule {
            k,
            n,
            steps: steps.to_vec(),
            cooldown_ms,
        };
        let rules = BTreeMap::from([
            (Verdict::NoFace, rule(6, 10, &[Action::LockScreen], 10_000)),
            (
                Verdict::WrongPerson,
                rule(5, 8, &[Action::LockScreen], 10_000),
            ),
            // Fed only by failed challenges, one verdict each.
            (
                Verdict::Spoof,
                rule(1, 1, &[Action::LockScreen, Action::SignOut], 0),
            ),
            (Verdict::Phone, rule(4, 6, &[Action::SignOut], 30_000)),
            (
                Verdict::MultipleFaces,
                rule(5, 8, &[Action::Warn, Action::LockScreen], 10_000),
            ),
            // A face too poor to judge is the camera's or the light's fault far more often
            // than a cheat's: it only ever warns ("face the camera", "more light").
            (Verdict::LowQuality, rule(10, 15, &[Action::Warn], 30_000)),
            // Frames that could not be decoded: not presence, and not for long.
            (
                Verdict::InvalidFrame,
                rule(6, 10, &[Action::Warn, Action::LockScreen], 10_000),
            ),
            // Silence: first a warning (a camera that dropped out), then the screen locks.
            (
                Verdict::NoFrames,
                rule(1, 1, &[Action::Warn, Action::LockScreen], 10_000),
            ),
        ]);
        Self {
            ok_to_allow: 5,
            evidence_frames: 3,
            no_frames_ms: 10_000,
            carry_over_ms: 30 * 60 * 1000,
            rules,
            not_ok: Some(JointRule {
                verdicts: vec![
                    Verdict::WrongPerson,
                    Verdict::NoFace,
                    Verdict::MultipleFaces,
                    Verdict::Phone,
                    Verdict::Spoof,
                    Verdict::InvalidFrame,
                ],
                rule: rule(6, 10, &[Action::LockScreen], 10_000),
            }),
            sign_out_ends_session: true,
        }
    }
}

impl PolicyConfig {
    /// Every problem at once.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.ok_to_allow == 0 {
            errors.push("policy.ok_to_allow must be greater than 0".into());
        }
        if self.evidence_frames == 0 || self.evidence_frames > 16 {
            errors.push("policy.evidence_frames must be within 1..=16".into());
        }
        if self.no_frames_ms != 0 && self.no_frames_ms < 1000 {
            errors.push(format!(
                "policy.no_frames_ms = {} must be 0 (off) or at least 1000",
                self.no_frames_ms
            ));
        }
        let check = |name: String, r: &Rule, errors: &mut Vec<String>| {
            if r.k == 0 || r.k > r.n {
                errors.push(format!(
                    "policy.{name}: k = {} must be within 1..=n ({})",
                    r.k, r.n
                ));
            }
            if r.n > 1000 {
                errors.push(format!("policy.{name}: n = {} is above 1000", r.n));
            }
            if r.steps.is_empty() || r.steps.contains(&Action::Allow) {
                errors.push(format!(
                    "policy.{name}: steps must name warn, lock_screen or sign_out"
                ));
            }
        };
        if let Some(j) = &self.not_ok {
            check("not_ok".into(), &j.rule, &mut errors);
            if j.verdicts.is_empty() {
                errors.push("policy.not_ok.verdicts must name at least one verdict".into());
            }
            for v in [Verdict::Ok, Verdict::LowQuality, Verdict::NoFrames] {
                if j.verdicts.contains(&v) {
                    errors.push(format!(
                        "policy.not_ok.verdicts: `{}` cannot count as a violation",
                        v.as_str()
                    ));
                }
            }
        }
        for (verdict, r) in &self.rules {
            let name = verdict.as_str();
            if *verdict == Verdict::Ok {
                errors.push("policy.rules.ok: `ok` cannot have a rule".into());
            }
            check(format!("rules.{name}"), r, &mut errors);
            if *verdict == Verdict::LowQuality && r.steps.iter().any(|s| *s != Action::Warn) {
                errors.push(
                    "policy.rules.low_quality: a face too poor to judge may only warn".into(),
                );
            }
        }
        errors
    }

    /// The longest window any rule needs.
    fn window(&self) -> usize {
        self.rules
            .values()
            .chain(self.not_ok.as_ref().map(|j| &j.rule))
            .map(|r| r.n)
            .max()
            .unwrap_or(1)
    }
}

/// A client's policy state as the directory keeps it, with its liveness challenge in
/// progress, so that neither a reconnect nor another edge escapes or restarts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedPolicy {
    pub saved_at_ms: u64,
    pub policy: ClientPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<crate::challenge::Challenge>,
    /// When the client last passed a challenge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passed_at_ms: Option<u64>,
}

/// A fired action, with its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The verdict that fired it (`Ok` for a return to `allow`).
    pub reason: Verdict,
    /// How many times this rule had fired before (0 for the first).
    pub step: usize,
    /// Fired by the joint `not_ok` rule (over `reason` and the other verdicts it names).
    pub joint: bool,
}

/// One client's policy state. It is saved in the directory ([`SavedPolicy`]) so that it
/// survives reconnecting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientPolicy {
    window: VecDeque<Verdict>,
    ok_streak: usize,
    state: Action,
    fired: BTreeMap<Verdict, (usize, u64)>,
    /// The joint rule's firings and when it last fired.
    #[serde(default)]
    joint_fired: (usize, u64),
    /// The return to `allow` is held (until [`ClientPolicy::release`]).
    #[serde(default)]
    held: bool,
}

impl Default for ClientPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientPolicy {
    pub fn new() -> Self {
        Self {
            window: VecDeque::new(),
            ok_streak: 0,
            state: Action::Allow,
            fired: BTreeMap::new(),
            joint_fired: (0, 0),
            held: false,
        }
    }

    /// Forget `verdict`'s firings: its ladder starts again at its first step (a passed
    /// challenge forgives the failures before it).
    pub fn forgive(&mut self, verdict: Verdict) {
        self.fired.remove(&verdict);
    }

    /// Hold the return to `allow`: ok frames no longer lift the action in force.
    pub fn hold(&mut self) {
        self.held = true;
    }

    /// Whether the return to `allow` is held.
    pub fn held(&self) -> bool {
        self.held
    }

    /// End a hold; when an action other than `allow` is in force, the client is allowed back
    /// now (`reason` `Ok`).
    pub fn release(&mut self) -> Option<Decision> {
        self.held = false;
        self.ok_streak = 0;
        (self.state != Action::Allow).then(|| {
            self.state = Action::Allow;
            Decision {
                action: Action::Allow,
                reason: Verdict::Ok,
                step: 0,
                joint: false,
            }
        })
    }

    /// Take the next step of `verdict`'s rule now, whatever its window and cooldown (a failed
    /// liveness challenge is one `spoof`). `None` when no rule is configured for it.
    pub fn fire(&mut self, cfg: &PolicyConfig, verdict: Verdict, now_ms: u64) -> Option<Decision> {
        let rule = cfg.rules.get(&verdict)?;
        self.window.push_back(verdict);
        while self.window.len() > cfg.window() {
            self.window.pop_front();
        }
        self.ok_streak = 0;
        let (times, _) = self.fired.get(&verdict).copied().unwrap_or((0, 0));
        let action = rule.steps[times.min(rule.steps.len() - 1)];
        self.fired.insert(verdict, (times + 1, now_ms));
        self.state = action;
        Some(Decision {
            action,
            reason: verdict,
            step: times,
            joint: false,
        })
    }

    /// The action in force.
    pub fn state(&self) -> Action {
        self.state
    }

    /// Resume a saved state, unless it is older than `carry_over_ms` (then start afresh).
    pub fn resume(cfg: &PolicyConfig, saved: Option<SavedPolicy>, now_ms: u64) -> Self {
        match saved {
            Some(s) if now_ms.saturating_sub(s.saved_at_ms) <= cfg.carry_over_ms => s.policy,
            _ => Self::new(),
        }
    }

    /// This state, to be saved at `now_ms`.
    pub fn save(&self, now_ms: u64) -> SavedPolicy {
        SavedPolicy {
            saved_at_ms: now_ms,
            policy: self.clone(),
            challenge: None,
            passed_at_ms: None,
        }
    }

    /// Take one frame's verdict at `now_ms`; returns the action that fires, if any.
    pub fn observe(
        &mut self,
        cfg: &PolicyConfig,
        verdict: Verdict,
        now_ms: u64,
    ) -> Option<Decision> {
        self.window.push_back(verdict);
        while self.window.len() > cfg.window() {
            self.window.pop_front();
        }
        if verdict == Verdict::Ok {
            self.ok_streak += 1;
            if self.ok_streak >= cfg.ok_to_allow && self.state != Action::Allow && !self.held {
                self.state = Action::Allow;
                return Some(Decision {
                    action: Action::Allow,
                    reason: Verdict::Ok,
                    step: 0,
                    joint: false,
                });
            }
            return None;
        }
        self.ok_streak = 0;
        let count = |n: usize, counts: &dyn Fn(Verdict) -> bool| {
            self.window
                .iter()
                .rev()
                .take(n)
                .filter(|v| counts(**v))
                .count()
        };
        // A verdict that reaches its own rule is that rule's (firing or cooling down); the
        // joint rule is for mixes no single rule sees.
        if let Some(rule) = cfg.rules.get(&verdict)
            && count(rule.n, &|v| v == verdict) >= rule.k
        {
            let (times, last) = self.fired.get(&verdict).copied().unwrap_or((0, 0));
            if times == 0 || now_ms >= last + rule.cooldown_ms {
                let action = rule.steps[times.min(rule.steps.len() - 1)];
                self.fired.insert(verdict, (times + 1, now_ms));
                self.state = action;
                return Some(Decision {
                    action,
                    reason: verdict,
                    step: times,
                    joint: false,
                });
            }
            return None;
        }
        let joint = cfg.not_ok.as_ref()?;
        if !joint.verdicts.contains(&verdict)
            || count(joint.rule.n, &|v| joint.verdicts.contains(&v)) < joint.rule.k
        {
            return None;
        }
        let (times, last) = self.joint_fired;
        if times > 0 && now_ms < last + joint.rule.cooldown_ms {
            return None;
        }
        // The joint rule never lowers an action a single rule put in force.
        let action = joint.rule.steps[times.min(joint.rule.steps.len() - 1)];
        if action < self.state {
            return None;
        }
        self.joint_fired = (times + 1, now_ms);
        self.state = action;
        Some(Decision {
            action,
            reason: verdict,
            step: times,
            joint: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::*;

    /// Feed verdicts at 5 frames per second; collect what fires.
    fn run(cfg: &PolicyConfig, verdicts: &[Verdict]) -> Vec<(usize, Decision)> {
        let mut p = ClientPolicy::new();
        verdicts
            .iter()
            .enumerate()
            .filter_map(|(i, v)| p.observe(cfg, *v, i as u64 * 200).map(|d| (i, d)))
            .collect()
    }

    #[test]
    fn flapping_never_fires() {
        let cfg = PolicyConfig::default();
        // (`spoof` is not a frame's verdict: only a failed challenge gives it, one at a time.)
        for bad in [
            NoFace,
            WrongPerson,
            Phone,
            MultipleFaces,
            LowQuality,
            InvalidFrame,
        ] {
            let frames: Vec<Verdict> = (0..500)
                .map(|i| if i % 2 == 0 { Ok } else { bad })
                .collect();
            assert_eq!(
                run(&cfg, &frames),
                vec![],
                "{bad:?} alternating with ok fired"
            );
        }
    }

    #[test]
    fn a_sustained_violation_fires_once_per_cooldown() {
        let cfg = PolicyConfig::default();
        // 30 s of the wrong person at 5 fps, with a 10 s cooldown: fires at 1 s, 11 s, 21 s.
        let fired = run(&cfg, &[WrongPerson; 150]);
        let at: Vec<usize> = fired.iter().map(|(i, _)| *i).collect();
        assert_eq!(at, vec![4, 54, 104]);
        assert!(
            fired
                .iter()
                .all(|(_, d)| d.action == Action::LockScreen && d.reason == WrongPerson)
        );
    }

    #[test]
    fn any_mix_of_violations_is_caught_by_the_joint_rule() {
        let cfg = PolicyConfig::default();
        // An impostor alternating with blank frames, or with garbage: no single rule fires,
        // the joint one locks.
        for other in [NoFace, InvalidFrame, MultipleFaces] {
            let frames: Vec<Verdict> = (0..40)
                .map(|i| if i % 2 == 0 { WrongPerson } else { other })
                .collect();
            let fired = run(&cfg, &frames);
            assert_eq!(fired[0].0, 5, "{other:?}: {fired:?}");
            assert!(fired[0].1.joint && fired[0].1.action == Action::LockScreen);
        }
        // A sustained single violation stays its own rule's, ladder included.
        let fired = run(&cfg, &[MultipleFaces; 40]);
        assert!(fired.iter().all(|(_, d)| !d.joint), "{fired:?}");
        // Low quality never counts, nor does a violation that merely alternates with ok.
        let frames: Vec<Verdict> = (0..100)
            .map(|i| [WrongPerson, LowQuality, Ok][i % 3])
            .collect();
        assert_eq!(run(&cfg, &frames), vec![]);
    }

    #[test]
    fn a_failed_challenge_locks_then_signs_out_and_a_held_lock_waits_for_a_pass() {
        let cfg = PolicyConfig::default();
        let mut p = ClientPolicy::new();
        let first = p.fire(&cfg, Spoof, 1_000).unwrap();
        assert_eq!((first.action, first.reason), (Action::LockScreen, Spoof));
        p.hold();
        // Ok frames do not lift a held lock...
        assert!((0..20).all(|i| p.observe(&cfg, Ok, 2_000 + i * 200).is_none()));
        // ...passing does.
        assert_eq!(p.release().unwrap().action, Action::Allow);
        assert!(p.release().is_none(), "already allowed");
        // The next failure signs out.
        assert_eq!(p.fire(&cfg, Spoof, 9_000).unwrap().action, Action::SignOut);
        // Without a `spoof` rule, a failure fires nothing.
        let mut bare = cfg.clone();
        bare.rules.remove(&Spoof);
        assert!(ClientPolicy::new().fire(&bare, Spoof, 0).is_none());
    }

    #[test]
    fn repeated_violations_escalate() {
        let cfg = PolicyConfig::default();
        let fired = run(&cfg, &[MultipleFaces; 120]);
        let actions: Vec<Action> = fired.iter().map(|(_, d)| d.action).collect();
        assert_eq!(
            actions,
            vec![Action::Warn, Action::LockScreen, Action::LockScreen]
        );
        // A custom ladder climbs to sign out.
        let mut cfg = PolicyConfig::default();
        cfg.rules.get_mut(&NoFace).unwrap().steps =
            vec![Action::Warn, Action::LockScreen, Action::SignOut];
        let actions: Vec<Action> = run(&cfg, &[NoFace; 200])
            .iter()
            .map(|(_, d)| d.action)
            .collect();
        assert_eq!(
            actions,
            vec![
                Action::Warn,
                Action::LockScreen,
                Action::SignOut,
                Action::SignOut
            ]
        );
    }

    #[test]
    fn poor_frames_only_warn_and_never_count_for_other_rules() {
        let cfg = PolicyConfig::default();
        // A minute of frames too poor to judge: warnings, 30 s apart, and nothing else.
        let fired = run(&cfg, &[LowQuality; 300]);
        let got: Vec<(usize, Action)> = fired.iter().map(|(i, d)| (*i, d.action)).collect();
        assert_eq!(got, vec![(9, Action::Warn), (159, Action::Warn)]);
        // Poor frames between wrong-person frames do not make up the wrong person's count.
        let frames: Vec<Verdict> = (0..200)
            .map(|i| if i % 3 == 0 { WrongPerson } else { LowQuality })
            .collect();
        assert!(
            run(&cfg, &frames)
                .iter()
                .all(|(_, d)| d.reason == LowQuality)
        );
        // And a config that tries to lock on them is refused.
        let mut bad = PolicyConfig::default();
        bad.rules.get_mut(&LowQuality).unwrap().steps = vec![Action::Warn, Action::LockScreen];
        assert!(bad.validate().join("\n").contains("may only warn"));
    }

    #[test]
    fn recovery_returns_to_allow() {
        let cfg = PolicyConfig::default();
        let mut frames = vec![Phone; 6];
        frames.extend([Ok; 4]);
        frames.push(Phone); // breaks the streak
        frames.extend([Ok; 5]);
        let fired = run(&cfg, &frames);
        let actions: Vec<(usize, Action)> = fired.iter().map(|(i, d)| (*i, d.action)).collect();
        assert_eq!(actions, vec![(3, Action::SignOut), (15, Action::Allow)]);
        // Allow is not repeated while already allowed.
        assert_eq!(run(&cfg, &[Ok; 50]), vec![]);
    }

    /// Each escalation step once, across a reconnect at `cut`: the second session resumes the
    /// first one's saved state through JSON, as the directory keeps it.
    fn run_with_reconnect(
        cfg: &PolicyConfig,
        verdicts: &[Verdict],
        cut: usize,
        gap_ms: u64,
    ) -> Vec<(usize, Decision)> {
        let mut p = ClientPolicy::new();
        let mut fired = Vec::new();
        for (i, v) in verdicts.iter().enumerate() {
            let mut now = i as u64 * 200;
            if i >= cut {
                now += gap_ms;
            }
            if i == cut {
                let saved = serde_json::to_string(&p.save(now - gap_ms)).unwrap();
                p = ClientPolicy::resume(cfg, Some(serde_json::from_str(&saved).unwrap()), now);
            }
            fired.extend(p.observe(cfg, *v, now).map(|d| (i, d)));
        }
        fired
    }

    #[test]
    fn escalation_survives_a_reconnect_but_not_a_long_absence() {
        let cfg = PolicyConfig::default();
        // Several faces for 12 s: warn at once, then lock after the 10 s cooldown. A reconnect
        // after 4 s (and a 2 s gap) changes nothing.
        let frames = vec![MultipleFaces; 60];
        let whole = run(&cfg, &frames);
        let cut = run_with_reconnect(&cfg, &frames, 20, 2_000);
        let steps = |d: &[(usize, Decision)]| d.iter().map(|(_, d)| d.action).collect::<Vec<_>>();
        assert_eq!(steps(&whole), [Action::Warn, Action::LockScreen]);
        assert_eq!(steps(&cut), [Action::Warn, Action::LockScreen]);
        // Back after longer than carry_over_ms: a fresh start warns again.
        let late = run_with_reconnect(&cfg, &frames, 20, cfg.carry_over_ms + 1);
        assert_eq!(steps(&late), [Action::Warn, Action::Warn]);
    }

    #[test]
    fn the_window_survives_a_reconnect() {
        let cfg = PolicyConfig::default();
        // 4 wrong-person frames, reconnect, 1 more: 5 of 8 fire the lock on the fifth.
        let frames = [WrongPerson; 5];
        let fired = run_with_reconnect(&cfg, &frames, 4, 1_000);
        assert_eq!(fired.len(), 1);
        assert_eq!((fired[0].0, fired[0].1.action), (4, Action::LockScreen));
    }

    #[test]
    fn silence_warns_then_locks_and_frames_lift_it() {
        let cfg = PolicyConfig::default();
        let mut p = ClientPolicy::new();
        // `no_frames` arrives once per silent period (10 s).
        let silent: Vec<_> = (1..=3)
            .filter_map(|i| p.observe(&cfg, NoFrames, i * cfg.no_frames_ms))
            .map(|d| d.action)
            .collect();
        assert_eq!(
            silent,
            [Action::Warn, Action::LockScreen, Action::LockScreen]
        );
        // The camera is back: ok frames bring the client back to allow.
        let back: Vec<_> = (0..cfg.ok_to_allow as u64)
            .filter_map(|i| p.observe(&cfg, Ok, 40_000 + i * 200))
            .collect();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].action, Action::Allow);
    }

    #[test]
    fn defaults_are_valid_and_bad_configs_are_listed() {
        assert!(PolicyConfig::default().validate().is_empty());
        let mut cfg = PolicyConfig {
            ok_to_allow: 0,
            ..PolicyConfig::default()
        };
        cfg.rules.get_mut(&Phone).unwrap().k = 9;
        cfg.rules.get_mut(&Spoof).unwrap().steps = vec![Action::Allow];
        let errors = cfg.validate().join("\n");
        for want in ["ok_to_allow", "rules.phone: k = 9", "rules.spoof: steps"] {
            assert!(errors.contains(want), "{errors}");
        }
    }

    #[test]
    fn policy_reads_from_toml() {
        let cfg: PolicyConfig = toml::from_str(
            "ok_to_allow = 3\n[rules.phone]\nk = 2\nn = 3\nsteps = [\"warn\", \"sign_out\"]\ncooldown_ms = 500\n",
        )
        .unwrap();
        assert_eq!(cfg.ok_to_allow, 3);
        assert_eq!(cfg.rules[&Phone].steps, vec![Action::Warn, Action::SignOut]);
        assert!(
            !cfg.rules.contains_key(&NoFace),
            "a [policy] table replaces the default rules"
        );
    }
}
