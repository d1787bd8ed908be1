//! How often a client's frames run the phone detector.
//!
//! A phone does not appear and vanish between two frames, and the detector is a quarter of a
//! frame's inference. So a steady candidate's frames run it on a cadence of their own
//! (`VIGIL_EDGE_PHONE_EVERY`: about every Nth frame), and on every frame for a while after a
//! hint. The rules:
//! - **A check is owed until it is answered.** A frame published as a check that comes back
//!   without the detector having run (dropped, expired, refused as a bad image) leaves the
//!   check owed: every next frame is one, until a checked result comes back.
//! - **A hint holds it on.** A phone seen, or any verdict but `ok`, makes the next `hold`
//!   frames all checks (`hold` is the phone rule's `n`, so that rule sees every frame while it
//!   counts). A later result without a phone does not lift it early, and an older result,
//!   come late, cannot either.
//! - **The gaps are drawn.** Between checks, `every - 1` to `every + 1` frames (1 for
//!   `every = 1`), at random: a client cannot tell which frame comes next.
//!
//! The worker runs the detector anyway on a frame whose verdict is not `ok` without it, so
//! every frame that can become evidence of a bad verdict is fully analysed; a frame that
//! skipped it says so (`skipped` in its analysis, never shown to the client).
//!
//! Pure and deterministic given its random source, like [`crate::policy`]: the edge session
//! asks [`PhoneCadence::due`] as it publishes each frame and tells [`PhoneCadence::observe`]
//! each result.

use rand::{Rng as _, SeedableRng as _};

/// One client's phone-detector cadence.
#[derive(Debug, Clone)]
pub struct PhoneCadence {
    every: u32,
    hold: u32,
    /// Frames to skip before the next check on the cadence.
    until_next: u32,
    /// Frames still to be checked after a hint.
    holding: u32,
    /// The newest frame published as a check, until a checked result at least as new is back.
    owed: Option<u64>,
    rng: rand::rngs::StdRng,
}

impl PhoneCadence {
    /// About every `every`th frame (1: every frame), and `hold` frames in a row after a hint.
    /// The first frame is a check.
    pub fn new(every: u32, hold: u32) -> Self {
        Self::seeded(every, hold, rand::random())
    }

    /// [`PhoneCadence::new`] with a fixed random source (tests, replays).
    pub fn seeded(every: u32, hold: u32, seed: u64) -> Self {
        Self {
            every: every.max(1),
            hold,
            until_next: 0,
            holding: 0,
            owed: None,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// Whether frame `seq`, about to be published, runs the phone detector.
    pub fn due(&mut self, seq: u64) -> bool {
        let due = self.holding > 0 || self.owed.is_some() || self.until_next == 0;
        if due {
            self.holding = self.holding.saturating_sub(1);
            self.owed = Some(seq);
            self.until_next = self.gap() - 1;
        } else {
            self.until_next -= 1;
        }
        due
    }

    /// Frames from one check to the next on the cadence.
    fn gap(&mut self) -> u32 {
        if self.every == 1 {
            return 1;
        }
        self.rng.random_range(self.every - 1..=self.every + 1)
    }

    /// Frame `seq`'s result came back: whether the detector ran on it, whether it saw a phone,
    /// and whether the verdict was `ok`.
    pub fn observe(&mut self, seq: u64, ran: bool, phone_seen: bool, verdict_ok: bool) {
        if ran && self.owed.is_some_and(|owed| seq >= owed) {
            self.owed = None;
        }
        if phone_seen || !verdict_ok {
            self.holding = self.holding.max(self.hold);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Publish frames 1..=n, answering each at once with `answer(seq, ran) -> Some((phone
    /// seen, ok))`, or `None` for a frame that never comes back; which were checks.
    fn run(
        cadence: &mut PhoneCadence,
        n: u64,
        answer: impl Fn(u64, bool) -> Option<(bool, bool)>,
    ) -> Vec<bool> {
        (1..=n)
            .map(|seq| {
                let ran = cadence.due(seq);
                if let Some((phone, ok)) = answer(seq, ran) {
                    cadence.observe(seq, ran, phone && ran, ok);
                }
                ran
            })
            .collect()
    }

    fn checks(ran: &[bool]) -> Vec<usize> {
        ran.iter()
            .enumerate()
            .filter(|(_, r)| **r)
            .map(|(i, _)| i + 1)
            .collect()
    }

    #[test]
    fn a_steady_candidate_is_checked_about_every_third_frame_at_drawn_gaps() {
        for seed in 0..50 {
            let mut c = PhoneCadence::seeded(3, 6, seed);
            let ran = run(&mut c, 300, |_, _| Some((false, true)));
            let at = checks(&ran);
            assert_eq!(at[0], 1, "the first frame is a check");
            for pair in at.windows(2) {
                let gap = pair[1] - pair[0];
                assert!((2..=4).contains(&gap), "seed {seed}: gap {gap}");
            }
            // A third of the frames, give or take the draws.
            assert!((80..=120).contains(&at.len()), "seed {seed}: {}", at.len());
        }
        // The gaps differ: no fixed phase to learn.
        let mut c = PhoneCadence::seeded(3, 6, 7);
        let at = checks(&run(&mut c, 60, |_, _| Some((false, true))));
        let gaps: std::collections::BTreeSet<usize> = at.windows(2).map(|p| p[1] - p[0]).collect();
        assert!(gaps.len() > 1, "{gaps:?}");
    }

    #[test]
    fn every_one_is_every_frame() {
        for every in [0, 1] {
            let mut c = PhoneCadence::seeded(every, 6, 1);
            assert!(
                run(&mut c, 20, |_, _| Some((false, true)))
                    .iter()
                    .all(|r| *r)
            );
        }
    }

    #[test]
    fn a_phone_seen_holds_checks_on_for_the_phone_rules_frames() {
        let mut c = PhoneCadence::seeded(3, 6, 3);
        // A phone comes into view at frame 20 and stays.
        let ran = run(&mut c, 40, |seq, _| Some((seq >= 20, true)));
        let first = (20..=40).find(|&s| ran[s as usize - 1]).unwrap();
        assert!(first - 20 < 4, "seen within the largest gap: frame {first}");
        // From the sighting on, every frame is a check while the phone stays.
        assert!(ran[first as usize - 1..].iter().all(|r| *r));
        // Put away at frame 50: `hold` more checks in a row, then the cadence again.
        let mut c = PhoneCadence::seeded(3, 6, 3);
        let ran = run(&mut c, 80, |seq, _| Some(((20..50).contains(&seq), true)));
        assert!(ran[49..55].iter().all(|r| *r), "{:?}", &ran[45..60]);
        assert!(ran[55..].iter().any(|r| !*r));
    }

    #[test]
    fn one_missed_detection_does_not_lift_the_hold() {
        let mut c = PhoneCadence::seeded(3, 6, 5);
        // Seen on frame 1, missed on 2 and 3 (partly hidden), seen on 4.
        let ran = run(&mut c, 8, |seq, _| Some((seq == 1 || seq == 4, true)));
        assert!(ran[..8].iter().all(|r| *r), "{ran:?}");
    }

    #[test]
    fn a_check_that_never_comes_back_is_owed() {
        let mut c = PhoneCadence::seeded(3, 6, 9);
        // Every check is dropped (a client that breaks exactly those frames): every frame
        // becomes one.
        let ran = run(&mut c, 12, |_, ran| (!ran).then_some((false, true)));
        assert!(ran.iter().all(|r| *r), "{ran:?}");
        // A check answered without the detector (a bad image): owed too.
        let mut c = PhoneCadence::seeded(3, 6, 9);
        assert!(c.due(1));
        c.observe(1, false, false, true);
        assert!(c.due(2));
        c.observe(2, true, false, true);
        assert!(!c.due(3));
    }

    #[test]
    fn a_late_older_result_does_not_settle_a_newer_check() {
        let mut c = PhoneCadence::seeded(3, 6, 11);
        assert!(c.due(1));
        // Frame 2 is published while 1 is in flight: still owed, so a check too.
        assert!(c.due(2));
        c.observe(1, true, false, true);
        assert!(c.due(3), "frame 2's check is not back yet");
        c.observe(2, true, false, true);
        c.observe(3, true, false, true);
        assert!(!c.due(4));
    }

    #[test]
    fn any_verdict_but_ok_holds_checks_on() {
        let mut c = PhoneCadence::seeded(3, 4, 13);
        // Frame 1 is `wrong_person`.
        let ran = run(&mut c, 6, |seq, _| Some((false, seq != 1)));
        assert_eq!(&ran[..5], &[true, true, true, true, true]);
    }
}
