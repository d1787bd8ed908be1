//! How often a client's frames run the phone detector.
//!
//! A phone does not appear and vanish between two frames, and the detector is a quarter of a
//! frame's inference. So a steady candidate's frames run it on a cadence of their own
//! (`VIGIL_EDGE_PHONE_EVERY`: about every Nth frame), and on every frame for a while after a
//! hint. The rules:
//! - **A lost check is made up at once.** A frame published as a check that is dropped after
//!   publishing (no result by its deadline, refused by the broker or by the worker) or comes
//!   back without the detector having run (a bad image) makes the next frame a check, and so
//!   on until a check is answered. A check still
//!   in flight changes nothing: were it to make the next frames checks, every frame would be one
//!   whenever results take longer than a frame, which is when the workers are short of time.
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
    /// The newest frame published as a check, while it is in flight.
    checking: Option<u64>,
    /// That check was lost: the next frame is one.
    owed: bool,
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
            checking: None,
            owed: false,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// Whether frame `seq`, about to be published, runs the phone detector.
    pub fn due(&mut self, seq: u64) -> bool {
        let due = self.holding > 0 || self.owed || self.until_next == 0;
        if due {
            self.holding = self.holding.saturating_sub(1);
            self.checking = Some(seq);
            self.owed = false;
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

    /// Frame `seq` was dropped (never analysed): if it was the check in flight, the next frame
    /// is one.
    pub fn dropped(&mut self, seq: u64) {
        if self.checking == Some(seq) {
            self.lost();
        }
    }

    fn lost(&mut self) {
        self.checking = None;
        self.owed = true;
    }

    /// Frame `seq`'s result came back: whether the detector ran on it, whether it saw a phone,
    /// and whether the verdict was `ok`.
    pub fn observe(&mut self, seq: u64, ran: bool, phone_seen: bool, verdict_ok: bool) {
        match self.checking {
            // A newer frame checked answers for the check in flight.
            Some(c) if ran && seq >= c => self.checking = None,
            Some(c) if !ran && seq == c => self.lost(),
            _ => {}
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
///   whose similarity clears the worker's threshold by `margin` and whose liveness models found
///   nothing (live, P(real) not under `pad_low`), and followed by the carried `ok` frames after
///   it (each result says where the face is).
/// - **Anything else drops it**: a full analysis that is not such a frame, however late it
///   comes back, and any suspicion of the stream liveness. The frames after it run every model
///   until a full analysis confirms a track again.
/// - **Full analyses at random, and at least every `recheck_ms`.** Any frame on the track is
///   fully analysed with probability `chance`, so no frame is known to be carried, and the next
///   is full once `recheck_ms` has passed since the last full one was published, or at once when
///   that one was dropped ([`IdentityCadence::dropped`]).
/// - **The worker checks the track on the frame itself**: a frame whose face left the track
///   runs every model at once (`vigil::inference::IdentityStack::analyze_with`).
/// - A challenge's frames are all full (the edge asks for that).
///
/// Pure and deterministic given its random source, like [`PhoneCadence`].
#[derive(Debug, Clone)]
pub struct IdentityCadence {
    recheck_ms: u64,
    margin: f32,
    pad_low: f32,
    chance: f64,
    track: Option<crate::wire::Track>,
    /// The newest frame answered (results from competing workers may arrive out of order).
    newest: Option<u64>,
    /// When the newest full frame was published.
    last_full_ms: Option<u64>,
    /// The newest full frame published, until it is answered.
    pending: Option<u64>,
    rng: rand::rngs::StdRng,
}

impl IdentityCadence {
    /// A full analysis at least every `recheck_ms` (0: every frame is full), any frame full
    /// with probability `chance`; a track confirmed by a match `margin` over the worker's
    /// threshold with no presentation-attack score under `pad_low`.
    pub fn new(recheck_ms: u64, chance: f64, margin: f32, pad_low: f32) -> Self {
        Self::seeded(recheck_ms, chance, margin, pad_low, rand::random())
    }

    /// [`IdentityCadence::new`] with a fixed random source (tests, `vigil eval`).
    pub fn seeded(recheck_ms: u64, chance: f64, margin: f32, pad_low: f32, seed: u64) -> Self {
        Self {
            recheck_ms,
            margin,
            pad_low,
            chance: chance.clamp(0.0, 1.0),
            track: None,
            newest: None,
            last_full_ms: None,
            pending: None,
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
        let due = self
            .last_full_ms
            .is_none_or(|at| now_ms >= at.saturating_add(self.recheck_ms));
        // Drawn on every frame, so that which frames are full follows no schedule.
        let drawn = self.rng.random_bool(self.chance);
        if self.recheck_ms > 0 && !full_wanted && !due && !drawn && self.track.is_some() {
            return self.track.clone();
        }
        self.last_full_ms = Some(now_ms);
        self.pending = Some(seq);
        None
    }

    /// Frame `seq` was dropped (never analysed): if it was the full frame awaited, the next
    /// frame is full.
    pub fn dropped(&mut self, seq: u64) {
        if self.pending == Some(seq) {
            self.pending = None;
            self.last_full_ms = None;
        }
    }

    /// Frame `seq`'s analysis came back; `suspected` when the stream liveness raised a
    /// suspicion on it.
    pub fn observe(&mut self, seq: u64, a: &crate::wire::IdentityAnalysis, suspected: bool) {
        let full = a.carried.is_empty();
        if full && self.pending.is_some_and(|p| seq >= p) {
            self.pending = None;
        }
        let threshold = a.thresholds.get("match_cosine").copied();
        let confirms = full
            && a.verdict == crate::wire::Verdict::Ok
            && a.faces.len() == 1
            && a.identity.as_ref().is_some_and(|i| {
                i.matched && threshold.is_some_and(|t| i.similarity >= t + self.margin)
            })
            && a.liveness
                .as_ref()
                .is_some_and(|l| l.live && l.pad.is_none_or(|p| p >= self.pad_low));
        let newer = self.newest.is_none_or(|n| seq >= n);
        if newer {
            self.newest = Some(seq);
        }
        if suspected || (full && !confirms) {
            // However late it comes back.
            self.track = None;
            return;
        }
        if !newer {
            // An older answer does not move the track.
            return;
        }
        if confirms {
            self.track = a.track.clone();
        } else if self.track.is_some() && a.verdict == crate::wire::Verdict::Ok {
            // Carried over: the face is still on the confirmed track; follow it.
            self.track = a.track.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Publish frames 1..=n, answering each at once with `answer(seq, ran) -> Some((phone
    /// seen, ok))`, or `None` for a frame that is dropped; which were checks.
    fn run(
        cadence: &mut PhoneCadence,
        n: u64,
        answer: impl Fn(u64, bool) -> Option<(bool, bool)>,
    ) -> Vec<bool> {
        (1..=n)
            .map(|seq| {
                let ran = cadence.due(seq);
                match answer(seq, ran) {
                    Some((phone, ok)) => cadence.observe(seq, ran, phone && ran, ok),
                    None => cadence.dropped(seq),
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

    /// At the worst, how long after a phone comes into view (and stays) the candidate is
    /// signed out under the default phone rule (4 of 6 frames), at 5 fps, when each result comes
    /// back before the `late + 1`th frame after its own is published. Frames published off the
    /// cadence before the first sighting came back are answered `ok` (the worker skips the
    /// detector on them) and count in the rule's window; the phone may appear just after a
    /// frame was taken, so the time runs from the frame before the first that shows it.
    fn worst_sign_out_ms(every: u32, late: u64) -> u64 {
        use crate::domain::{Action, Verdict};
        use crate::policy::{ClientPolicy, PolicyConfig};
        const FRAME_MS: u64 = 200;
        let cfg = PolicyConfig::default();
        let hold = cfg.rules[&Verdict::Phone].n as u32;
        let mut worst = 0;
        for seed in 0..300 {
            for shown in 10..20u64 {
                let mut c = PhoneCadence::seeded(every, hold, seed);
                let mut policy = ClientPolicy::new();
                let mut in_flight = std::collections::VecDeque::new();
                let mut signed_out = None;
                'frames: for seq in 1..=80u64 {
                    while let Some(&(s, ran)) = in_flight.front() {
                        if s + 1 + late > seq {
                            break;
                        }
                        in_flight.pop_front();
                        let seen = ran && s >= shown;
                        c.observe(s, ran, seen, !seen);
                        let verdict = if seen { Verdict::Phone } else { Verdict::Ok };
                        let fired = policy.observe(&cfg, verdict, seq * FRAME_MS);
                        if fired.map(|d| d.action) == Some(Action::SignOut) {
                            signed_out = Some(seq);
                            break 'frames;
                        }
                    }
                    in_flight.push_back((seq, c.due(seq)));
                }
                let at = signed_out.expect("signed out within 80 frames");
                worst = worst.max((at - (shown - 1)) * FRAME_MS);
            }
        }
        worst
    }

    /// The promise behind `edge.phone_every`'s bound (1..=4) and its default (3): a phone in
    /// view is signed out within 2 s at any allowed cadence while results come back within a
    /// frame (200 ms at 5 fps), and at the default while they come back within two (400 ms).
    /// Every fourth frame would keep it only within 200 ms, which is why the default is 3.
    #[test]
    fn a_phone_in_view_signs_out_within_two_seconds() {
        for every in 1..=4 {
            let ms = worst_sign_out_ms(every, 0);
            assert!(
                ms <= 2_000,
                "every {every}, results within a frame: {ms} ms"
            );
        }
        // The figures of the README's table ("Cost per candidate").
        assert_eq!(worst_sign_out_ms(3, 0), 1_600);
        assert_eq!(worst_sign_out_ms(3, 1), 2_000);
        assert_eq!(worst_sign_out_ms(4, 0), 1_800);
        assert_eq!(worst_sign_out_ms(4, 1), 2_200);
    }

    #[test]
    fn one_missed_detection_does_not_lift_the_hold() {
        let mut c = PhoneCadence::seeded(3, 6, 5);
        // Seen on frame 1, missed on 2 and 3 (partly hidden), seen on 4.
        let ran = run(&mut c, 8, |seq, _| Some((seq == 1 || seq == 4, true)));
        assert!(ran[..8].iter().all(|r| *r), "{ran:?}");
    }

    #[test]
    fn a_lost_check_is_made_up_on_the_next_frame() {
        let mut c = PhoneCadence::seeded(3, 6, 9);
        // Every check is dropped (a client that breaks exactly those frames): every frame
        // becomes one.
        let ran = run(&mut c, 12, |_, ran| (!ran).then_some((false, true)));
        assert!(ran.iter().all(|r| *r), "{ran:?}");
        // One dropped check: the next frame only, then the cadence again.
        let mut c = PhoneCadence::seeded(3, 6, 9);
        let ran = run(&mut c, 30, |seq, _| (seq != 1).then_some((false, true)));
        assert!(ran[0] && ran[1], "{ran:?}");
        assert!((8..=16).contains(&checks(&ran).len()), "{ran:?}");
        // A check answered without the detector (a bad image): owed too.
        let mut c = PhoneCadence::seeded(3, 6, 9);
        assert!(c.due(1));
        c.observe(1, false, false, true);
        assert!(c.due(2));
        c.observe(2, true, false, true);
        assert!(!c.due(3));
    }

    #[test]
    fn checks_in_flight_leave_the_cadence_alone() {
        for seed in 0..20 {
            // Results slower than frames (a busy worker): the checks stay about a third.
            let mut c = PhoneCadence::seeded(3, 6, seed);
            let ran: Vec<bool> = (1..=90).map(|seq| c.due(seq)).collect();
            let n = checks(&ran).len();
            assert!((24..=36).contains(&n), "seed {seed}: {n} checks");
        }
    }

    #[test]
    fn a_late_older_result_neither_settles_nor_loses_a_newer_check() {
        let mut c = PhoneCadence::seeded(3, 6, 11);
        assert!(c.due(1));
        let next = (2..10).find(|&s| c.due(s)).expect("a second check");
        // Frame 1 comes back late, without the detector, and again (a redelivery) with it:
        // neither says anything of the newer check, still in flight.
        c.observe(1, false, false, true);
        c.observe(1, true, false, true);
        assert!(!c.due(next + 1), "nothing is owed");
        // The newer check is dropped: the next frame makes it up.
        c.dropped(next);
        assert!(c.due(next + 2));
        c.observe(next + 2, true, false, true);
        assert!(!c.due(next + 3));
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
                liveness: (!carried).then_some(crate::wire::LivenessScore {
                    p_live: 0.9,
                    pad: Some(0.95),
                    live: true,
                    temporal: None,
                }),
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
                    c.observe(seq, &a, false);
                    t.is_none()
                })
                .collect()
        }

        #[test]
        fn a_confirmed_track_is_carried_with_a_full_frame_at_random_and_at_least_every_recheck() {
            let mut gaps = std::collections::BTreeSet::new();
            for seed in 0..30 {
                let mut c = IdentityCadence::seeded(1_000, 0.15, 0.05, 0.2, seed);
                let full = run(&mut c, 300, |_| (Verdict::Ok, 0.7));
                let at: Vec<u64> = (0..300).filter(|i| full[*i as usize]).collect();
                assert_eq!(at[0], 0, "the first frame is full");
                for pair in at.windows(2) {
                    let gap_ms = (pair[1] - pair[0]) * 200;
                    assert!((200..=1_000).contains(&gap_ms), "seed {seed}: {gap_ms} ms");
                    gaps.insert(gap_ms);
                }
                // About a quarter of the frames are full.
                assert!((55..=130).contains(&at.len()), "seed {seed}: {}", at.len());
            }
            // Any frame may be the full one: no gap is safe to count on.
            assert_eq!(gaps.len(), 5, "{gaps:?}");
        }

        #[test]
        fn any_verdict_but_ok_drops_the_track_until_a_confident_full_ok() {
            let mut c = IdentityCadence::seeded(1_000, 0.15, 0.05, 0.2, 1);
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
            let mut c = IdentityCadence::seeded(1_000, 0.15, 0.05, 0.2, 2);
            let full = run(&mut c, 50, |_| (Verdict::Ok, 0.44));
            assert!(full.iter().all(|f| *f));
        }

        #[test]
        fn off_and_on_a_challenge_every_frame_is_full() {
            let mut c = IdentityCadence::seeded(0, 0.15, 0.05, 0.2, 3);
            assert!(run(&mut c, 20, |_| (Verdict::Ok, 0.9)).iter().all(|f| *f));
            let mut c = IdentityCadence::seeded(1_000, 0.0, 0.05, 0.2, 3);
            run(&mut c, 3, |_| (Verdict::Ok, 0.9));
            // A challenge wants every frame full.
            assert!((3..20).all(|seq| c.track_for(seq, seq * 200, true).is_none()));
            c.observe(19, &answer(Verdict::Ok, Some(0.9), false), false);
            assert!(c.track_for(20, 3_800, false).is_some());
            // A second past the last full frame, the next is full.
            assert!(c.track_for(21, 4_800, false).is_none());
        }

        #[test]
        fn a_late_full_answer_that_is_not_ok_still_drops_the_track() {
            let mut c = IdentityCadence::seeded(1_000, 0.0, 0.05, 0.2, 4);
            c.track_for(0, 0, false);
            c.track_for(1, 200, false);
            c.observe(1, &answer(Verdict::Ok, Some(0.9), false), false);
            assert!(c.track_for(2, 400, false).is_some());
            // Frame 0 comes back late, and wrong: the track goes.
            c.observe(0, &answer(Verdict::WrongPerson, Some(0.1), false), false);
            assert!(c.track_for(3, 600, false).is_none());
            // A suspicion drops it too.
            c.observe(3, &answer(Verdict::Ok, Some(0.9), false), false);
            assert!(c.track_for(4, 800, false).is_some());
            c.observe(4, &answer(Verdict::Ok, None, true), true);
            assert!(c.track_for(5, 1_000, false).is_none());
            // A full `ok` whose presentation-attack score is under `pad_low` confirms nothing.
            let mut a = answer(Verdict::Ok, Some(0.9), false);
            a.liveness.as_mut().unwrap().pad = Some(0.1);
            c.observe(5, &a, false);
            assert!(c.track_for(6, 1_200, false).is_none());
        }

        #[test]
        fn a_dropped_full_frame_makes_the_next_one_full() {
            let mut c = IdentityCadence::seeded(1_000, 0.0, 0.05, 0.2, 5);
            assert!(c.track_for(0, 0, false).is_none());
            c.observe(0, &answer(Verdict::Ok, Some(0.9), false), false);
            assert!(c.track_for(1, 200, false).is_some());
            // While a full frame is in flight (not yet answered), the others are carried.
            assert!(c.track_for(5, 1_000, false).is_none());
            assert!(c.track_for(6, 1_200, false).is_some());
            // It is dropped: the next one is full.
            c.dropped(5);
            assert!(c.track_for(7, 1_400, false).is_none());
        }
    }
}
