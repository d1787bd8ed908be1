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

/// One client's track reuse: which frames may carry the identity over from the face track
/// instead of running the recogniser and the liveness models.
///
/// The rules:
/// - **Only a confirmed track is carried.** The track is set by a fully analysed `ok` frame
///   whose similarity clears the worker's threshold by `margin`, and followed by the `ok` frames
///   after it (each result says where the face is). Any other verdict drops it, so the frames
///   after a `wrong_person`, a second face, a poor face or no face run every model until a
///   full `ok` confirms a track again.
/// - **A full analysis at least every `recheck_ms`.** The next full frame is drawn between
///   half of `recheck_ms` and all of it after the last one was published, so a client cannot
///   tell which frame is checked; and a full frame whose answer does not come back (dropped,
///   expired) is owed until one does.
/// - **The worker checks the track on the frame itself**: a frame whose face left the track
///   runs every model at once ([`crate::inference::IdentityStack::analyze_with`]).
/// - A challenge's frames are all full (the edge asks for that).
///
/// Pure and deterministic given its random source, like [`PhoneCadence`].
#[derive(Debug, Clone)]
pub struct IdentityCadence {
    recheck_ms: u64,
    margin: f32,
    track: Option<crate::wire::Track>,
    /// The newest frame answered (results from competing workers may arrive out of order).
    newest: Option<u64>,
    /// When the next full frame is due.
    next_full_ms: u64,
    /// The newest frame published full, until a full result at least as new is back.
    owed: Option<u64>,
    rng: rand::rngs::StdRng,
}

impl IdentityCadence {
    /// A full analysis at least every `recheck_ms` (0: every frame is full).
    pub fn new(recheck_ms: u64, margin: f32) -> Self {
        Self::seeded(recheck_ms, margin, rand::random())
    }

    /// [`IdentityCadence::new`] with a fixed random source (tests, `vigil eval`).
    pub fn seeded(recheck_ms: u64, margin: f32, seed: u64) -> Self {
        Self {
            recheck_ms,
            margin,
            track: None,
            newest: None,
            next_full_ms: 0,
            owed: None,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// The track frame `seq`, about to be published at `now_ms`, may carry the identity over
    /// to; `None` when it must be fully analysed.
    pub fn track_for(
        &mut self,
        seq: u64,
        now_ms: u64,
        full_wanted: bool,
    ) -> Option<crate::wire::Track> {
        let carry = self.recheck_ms > 0
            && !full_wanted
            && self.owed.is_none()
            && now_ms < self.next_full_ms
            && self.track.is_some();
        if carry {
            return self.track.clone();
        }
        self.owed = Some(seq);
        let gap = if self.recheck_ms == 0 {
            0
        } else {
            self.rng.random_range(self.recheck_ms / 2..=self.recheck_ms)
        };
        self.next_full_ms = now_ms + gap;
        None
    }

    /// Frame `seq`'s analysis came back.
    pub fn observe(&mut self, seq: u64, a: &crate::wire::IdentityAnalysis) {
        let full = a.carried.is_empty();
        if full && self.owed.is_some_and(|owed| seq >= owed) {
            self.owed = None;
        }
        if self.newest.is_some_and(|n| seq < n) {
            return;
        }
        self.newest = Some(seq);
        let threshold = a.thresholds.get("match_cosine").copied();
        let confident = a.identity.as_ref().is_some_and(|i| {
            i.matched && threshold.is_some_and(|t| i.similarity >= t + self.margin)
        });
        self.track = match (a.verdict, a.faces.len(), &a.track) {
            (crate::wire::Verdict::Ok, 1, Some(t)) if confident => Some(t.clone()),
            // Carried over: the face is still on the confirmed track; follow it.
            (crate::wire::Verdict::Ok, 1, Some(t)) if !full && self.track.is_some() => {
                Some(t.clone())
            }
            _ => None,
        };
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

    mod identity {
        use super::super::IdentityCadence;
        use crate::wire::{IdentityAnalysis, IdentityScore, Track, Verdict};

        fn track(x: f32) -> Track {
            Track {
                x,
                y: 100.0,
                w: 120.0,
                h: 150.0,
                landmarks: [[x + 30.0, 150.0]; 5],
            }
        }

        /// A worker's answer: a full analysis (with its similarity) or a carried one.
        fn answer(verdict: Verdict, similarity: Option<f32>, carried: bool) -> IdentityAnalysis {
            IdentityAnalysis {
                verdict,
                faces: vec![crate::wire::FaceBox {
                    x: 10.0,
                    y: 100.0,
                    w: 120.0,
                    h: 150.0,
                    score: 0.9,
                }],
                identity: if carried {
                    None
                } else {
                    similarity.map(|s| IdentityScore {
                        similarity: s,
                        matched: s >= 0.41,
                    })
                },
                liveness: None,
                phone: None,
                models: vec![],
                skipped: vec![],
                carried: if carried {
                    vec!["sface:2021dec".into()]
                } else {
                    vec![]
                },
                thresholds: [("match_cosine".to_owned(), 0.41)].into_iter().collect(),
                quality: None,
                appearance: None,
                track: Some(track(10.0)),
            }
        }

        /// Frames at 5 fps, each answered at once: `full(seq)` is the verdict and similarity
        /// of a full analysis; a frame given a track is carried. Which frames were full.
        fn run(c: &mut IdentityCadence, n: u64, full: impl Fn(u64) -> (Verdict, f32)) -> Vec<bool> {
            (0..n)
                .map(|seq| {
                    let t = c.track_for(seq, seq * 200, false);
                    let a = match t {
                        Some(_) => answer(Verdict::Ok, None, true),
                        None => {
                            let (v, s) = full(seq);
                            answer(v, Some(s), false)
                        }
                    };
                    c.observe(seq, &a);
                    t.is_none()
                })
                .collect()
        }

        #[test]
        fn a_confirmed_track_is_carried_with_a_full_frame_at_least_every_recheck() {
            for seed in 0..30 {
                let mut c = IdentityCadence::seeded(1_000, 0.05, seed);
                let full = run(&mut c, 300, |_| (Verdict::Ok, 0.7));
                let at: Vec<u64> = (0..300).filter(|i| full[*i as usize]).collect();
                assert_eq!(at[0], 0, "the first frame is full");
                for pair in at.windows(2) {
                    let gap_ms = (pair[1] - pair[0]) * 200;
                    // Drawn from half of recheck_ms to all of it, in whole frames.
                    assert!((400..=1_000).contains(&gap_ms), "seed {seed}: {gap_ms} ms");
                }
                // Between a fifth and two fifths of the frames are full.
                assert!((60..=130).contains(&at.len()), "seed {seed}: {}", at.len());
            }
        }

        #[test]
        fn any_verdict_but_ok_drops_the_track_until_a_confident_full_ok() {
            let mut c = IdentityCadence::seeded(1_000, 0.05, 1);
            // Wrong person from frame 20 to 29 (full frames only can say so), ok after.
            let full = run(&mut c, 60, |seq| {
                if (20..30).contains(&seq) {
                    (Verdict::WrongPerson, 0.1)
                } else {
                    (Verdict::Ok, 0.7)
                }
            });
            let first_bad = (20..30).find(|s| full[*s]).expect("a recheck within 1 s");
            assert!(first_bad <= 25);
            // From the first wrong_person answer until frame 30, every frame is full.
            assert!(full[first_bad..=30].iter().all(|f| *f), "{full:?}");
            // Then the confirmed track is carried again.
            assert!(!full[31]);
        }

        #[test]
        fn a_match_without_the_margin_is_never_carried() {
            let mut c = IdentityCadence::seeded(1_000, 0.05, 2);
            let full = run(&mut c, 50, |_| (Verdict::Ok, 0.44));
            assert!(full.iter().all(|f| *f));
        }

        #[test]
        fn off_a_challenge_and_an_unanswered_full_frame_run_every_model() {
            let mut c = IdentityCadence::seeded(0, 0.05, 3);
            assert!(run(&mut c, 20, |_| (Verdict::Ok, 0.9)).iter().all(|f| *f));
            let mut c = IdentityCadence::seeded(1_000, 0.05, 3);
            run(&mut c, 3, |_| (Verdict::Ok, 0.9));
            // A challenge wants every frame full.
            assert!((3..20).all(|seq| c.track_for(seq, seq * 200, true).is_none()));
            // Frame 19 was published full and never answered: owed, so 20.. are full too,
            // until a full answer comes back.
            assert!(c.track_for(20, 30_000, false).is_none());
            assert!(c.track_for(21, 30_010, false).is_none());
            c.observe(21, &answer(Verdict::Ok, Some(0.9), false));
            assert!(c.track_for(22, 30_020, false).is_some());
            // A carried answer does not settle a full frame owed.
            assert!(c.track_for(23, 40_000, false).is_none());
            c.observe(22, &answer(Verdict::Ok, None, true));
            assert!(c.track_for(24, 40_010, false).is_none());
        }

        #[test]
        fn an_older_answer_does_not_move_the_track() {
            let mut c = IdentityCadence::seeded(1_000, 0.05, 4);
            c.track_for(0, 0, false);
            c.track_for(1, 200, false);
            c.observe(1, &answer(Verdict::Ok, Some(0.9), false));
            // Frame 0 comes back late, wrong: the newer track stands.
            c.observe(0, &answer(Verdict::WrongPerson, Some(0.1), false));
            assert!(c.track_for(2, 400, false).is_some());
        }
    }
}
