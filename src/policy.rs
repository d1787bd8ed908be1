//! The action policy: turns a client's stream of per-frame verdicts into enforced actions.
//!
//! Pure and deterministic: [`ClientPolicy::observe`] takes a verdict and the time, and says
//! whether an action fires. A rule fires when `k` of the last `n` frames share its verdict and
//! the rule is not cooling down; each firing of a rule takes the next step of its escalation
//! (for example warn, then lock_screen); `ok_to_allow` consecutive `ok` frames bring the client
//! back to `allow`. The edge session runs one per client, where results arrive in order.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::wire::Verdict;

/// What the client must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Warn,
    LockScreen,
    SignOut,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Warn => "warn",
            Action::LockScreen => "lock_screen",
            Action::SignOut => "sign_out",
        }
    }
}

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
    pub rules: BTreeMap<Verdict, Rule>,
}

impl Default for PolicyConfig {
    /// The old system's meaning: no face and the wrong person lock the screen, a spoof or a
    /// phone signs out, several faces warn and then lock. Every `k` is above half of its `n`,
    /// so a verdict that merely alternates with `ok` never fires.
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
            (Verdict::Spoof, rule(4, 6, &[Action::SignOut], 30_000)),
            (Verdict::Phone, rule(4, 6, &[Action::SignOut], 30_000)),
            (
                Verdict::MultipleFaces,
                rule(5, 8, &[Action::Warn, Action::LockScreen], 10_000),
            ),
            // A face too poor to judge is the camera's or the light's fault far more often
            // than a cheat's: it only ever warns ("face the camera", "more light").
            (Verdict::LowQuality, rule(10, 15, &[Action::Warn], 30_000)),
        ]);
        Self {
            ok_to_allow: 5,
            evidence_frames: 3,
            rules,
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
        for (verdict, r) in &self.rules {
            let name = verdict.as_str();
            if *verdict == Verdict::Ok {
                errors.push("policy.rules.ok: `ok` cannot have a rule".into());
            }
            if r.k == 0 || r.k > r.n {
                errors.push(format!(
                    "policy.rules.{name}: k = {} must be within 1..=n ({})",
                    r.k, r.n
                ));
            }
            if r.n > 1000 {
                errors.push(format!("policy.rules.{name}: n = {} is above 1000", r.n));
            }
            if r.steps.is_empty() || r.steps.contains(&Action::Allow) {
                errors.push(format!(
                    "policy.rules.{name}: steps must name warn, lock_screen or sign_out"
                ));
            }
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
        self.rules.values().map(|r| r.n).max().unwrap_or(1)
    }
}

/// A fired action, with its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The verdict that fired it (`Ok` for a return to `allow`).
    pub reason: Verdict,
    /// How many times this rule had fired before (0 for the first).
    pub step: usize,
}

/// One client's policy state.
#[derive(Debug, Clone)]
pub struct ClientPolicy {
    window: VecDeque<Verdict>,
    ok_streak: usize,
    state: Action,
    fired: BTreeMap<Verdict, (usize, u64)>,
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
        }
    }

    /// The action in force.
    pub fn state(&self) -> Action {
        self.state
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
            if self.ok_streak >= cfg.ok_to_allow && self.state != Action::Allow {
                self.state = Action::Allow;
                return Some(Decision {
                    action: Action::Allow,
                    reason: Verdict::Ok,
                    step: 0,
                });
            }
            return None;
        }
        self.ok_streak = 0;
        let rule = cfg.rules.get(&verdict)?;
        let seen = self
            .window
            .iter()
            .rev()
            .take(rule.n)
            .filter(|v| **v == verdict)
            .count();
        if seen < rule.k {
            return None;
        }
        let (times, last) = self.fired.get(&verdict).copied().unwrap_or((0, 0));
        if times > 0 && now_ms < last + rule.cooldown_ms {
            return None;
        }
        let action = rule.steps[times.min(rule.steps.len() - 1)];
        self.fired.insert(verdict, (times + 1, now_ms));
        self.state = action;
        Some(Decision {
            action,
            reason: verdict,
            step: times,
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
        for bad in [NoFace, WrongPerson, Spoof, Phone, MultipleFaces, LowQuality] {
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
        let mut frames = vec![Spoof; 6];
        frames.extend([Ok; 4]);
        frames.push(Spoof); // breaks the streak
        frames.extend([Ok; 5]);
        let fired = run(&cfg, &frames);
        let actions: Vec<(usize, Action)> = fired.iter().map(|(i, d)| (*i, d.action)).collect();
        assert_eq!(actions, vec![(3, Action::SignOut), (15, Action::Allow)]);
        // Allow is not repeated while already allowed.
        assert_eq!(run(&cfg, &[Ok; 50]), vec![]);
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
