//! A session's in-flight window, as pure state: which frames are published and awaiting an
//! answer, and the one frame waiting for a slot. No I/O and no clock of its own; the session
//! publishes, reads the time and tells the client, and this module decides.
//!
//! **Invariant: every frame the window accepts leaves it exactly once** — through
//! [`Window::answer`], [`Window::fail`], as the frame `offer` says it superseded,
//! [`Window::overdue`] or [`Window::drain`] — and the session answers the client once for each
//! (`result` or `dropped`). A second answer for a frame that already left is refused, so a
//! redelivered frame analysed twice, or a result that arrives after the sweep, is not sent
//! twice. The tests below drive event sequences and check exactly that.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use uuid::Uuid;

use crate::wire::client::ClientFrame;

/// A frame accepted by the session and not yet published.
#[derive(Debug)]
pub struct Pending {
    pub seq: u64,
    pub frame: ClientFrame,
    pub received: Instant,
    pub received_ms: u64,
}

/// A published frame awaiting its answer.
#[derive(Debug)]
pub struct Inflight {
    pub frame_id: Uuid,
    pub received: Instant,
    pub received_ms: u64,
    pub deadline: Instant,
    /// Kept (shared, not copied) in case the result makes it evidence.
    pub jpeg: Bytes,
}

/// What to do with a frame offered to the window.
#[derive(Debug)]
pub enum Offer {
    /// A slot is free: publish it now (then [`Window::published`], or answer it if that fails).
    Publish(Pending),
    /// It waits for a slot; a frame that was already waiting was superseded (answer it
    /// `dropped`, superseded).
    Queued { superseded: Option<u64> },
    /// This seq is already in the window; the new frame is refused (answer it `dropped`).
    Duplicate,
}

/// Frames that left the window because they ran out of time.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Overdue {
    /// Published, with no answer within the deadline plus grace.
    pub published: Vec<u64>,
    /// Waited for a slot past the deadline.
    pub waiting: Option<u64>,
}

#[derive(Debug)]
pub struct Window {
    max_inflight: usize,
    deadline: Duration,
    inflight: HashMap<u64, Inflight>,
    pending: Option<Pending>,
}

impl Window {
    pub fn new(max_inflight: usize, deadline: Duration) -> Self {
        Self {
            max_inflight,
            deadline,
            inflight: HashMap::new(),
            pending: None,
        }
    }

    /// Frames published and awaiting an answer.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Take a new frame: publish it, queue it (superseding the waiting one), or refuse a
    /// duplicate seq.
    pub fn offer(&mut self, pending: Pending) -> Offer {
        let seq = pending.seq;
        if self.inflight.contains_key(&seq) || self.pending.as_ref().is_some_and(|p| p.seq == seq) {
            return Offer::Duplicate;
        }
        if self.inflight.len() < self.max_inflight {
            return Offer::Publish(pending);
        }
        let superseded = self.pending.replace(pending).map(|older| older.seq);
        Offer::Queued { superseded }
    }

    /// The broker took the frame: it is in flight under `frame_id` until answered.
    pub fn published(&mut self, p: Pending, frame_id: Uuid) {
        let deadline = p.received + self.deadline;
        self.inflight.insert(
            p.seq,
            Inflight {
                frame_id,
                received: p.received,
                received_ms: p.received_ms,
                deadline,
                jpeg: p.frame.jpeg,
            },
        );
    }

    /// The worker's answer for `seq` as published under `frame_id`. `None` when that frame
    /// already left the window (answered, swept, or a stale publish of a reused seq).
    pub fn answer(&mut self, seq: u64, frame_id: Uuid) -> Option<Inflight> {
        if self.inflight.get(&seq)?.frame_id != frame_id {
            return None;
        }
        self.inflight.remove(&seq)
    }

    /// The broker refused the frame after all (a failed confirm). `true` when it was still in
    /// flight and so now needs its `dropped` answer.
    pub fn fail(&mut self, seq: u64, frame_id: Uuid) -> bool {
        self.answer(seq, frame_id).is_some()
    }

    /// The waiting frame, when a slot is free for it.
    pub fn next_to_publish(&mut self) -> Option<Pending> {
        if self.inflight.len() < self.max_inflight {
            self.pending.take()
        } else {
            None
        }
    }

    /// Frames out of time at `now`: published ones past their deadline plus `grace` (the
    /// worker's own `expired` answer gets that long to arrive), and the waiting one past its
    /// deadline. Each is removed; seqs come in ascending order.
    pub fn overdue(&mut self, now: Instant, grace: Duration) -> Overdue {
        let mut published: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, f)| now > f.deadline + grace)
            .map(|(seq, _)| *seq)
            .collect();
        published.sort_unstable();
        for seq in &published {
            self.inflight.remove(seq);
        }
        let deadline = self.deadline;
        let waiting = self
            .pending
            .take_if(|p| now > p.received + deadline)
            .map(|p| p.seq);
        Overdue { published, waiting }
    }

    /// Empty the window (the session is ending): every seq still in it, ascending.
    pub fn drain(&mut self) -> Vec<u64> {
        let mut seqs: Vec<u64> = self.inflight.drain().map(|(seq, _)| seq).collect();
        seqs.extend(self.pending.take().map(|p| p.seq));
        seqs.sort_unstable();
        seqs
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// What happens to a session's window, one event at a time.
    #[derive(Clone, Copy, Debug)]
    enum Event {
        /// The client sends a frame with this seq.
        Frame(u64),
        /// The worker answers the frame published under this seq (its latest publish).
        Answer(u64),
        /// The worker answers this seq again (a redelivery analysed twice).
        AnswerAgain(u64),
        /// The broker refuses the publish of this seq after all.
        ConfirmFails(u64),
        /// The publish itself fails: the session answers it at once.
        PublishFails,
        /// Time passes (ms).
        Wait(u64),
        /// The session ends.
        Close,
    }
    use Event::*;

    const DEADLINE: Duration = Duration::from_millis(1000);
    const GRACE: Duration = Duration::from_millis(250);

    /// The session's side, as far as the window sees it.
    struct Harness {
        w: Window,
        now: Instant,
        answers: BTreeMap<u64, Vec<&'static str>>,
        /// The frame id of each seq's latest publish.
        ids: HashMap<u64, Uuid>,
        fail_next_publish: bool,
        peak: usize,
    }

    impl Harness {
        fn answer(&mut self, seq: u64, how: &'static str) {
            self.answers.entry(seq).or_default().push(how);
        }

        fn publish(&mut self, p: Pending) {
            if std::mem::take(&mut self.fail_next_publish) {
                self.answer(p.seq, "publish_failed");
            } else {
                let id = Uuid::now_v7();
                self.ids.insert(p.seq, id);
                self.w.published(p, id);
            }
        }

        fn id(&self, seq: u64) -> Uuid {
            self.ids.get(&seq).copied().unwrap_or_else(Uuid::nil)
        }

        fn on(&mut self, event: Event) {
            match event {
                Frame(seq) => {
                    let p = Pending {
                        seq,
                        frame: ClientFrame {
                            seq: Some(seq),
                            captured_at_ms: None,
                            jpeg: Bytes::from_static(b"jpeg"),
                        },
                        received: self.now,
                        received_ms: 0,
                    };
                    match self.w.offer(p) {
                        Offer::Publish(p) => self.publish(p),
                        Offer::Queued { superseded } => {
                            if let Some(older) = superseded {
                                self.answer(older, "superseded");
                            }
                        }
                        Offer::Duplicate => self.answer(seq, "duplicate"),
                    }
                }
                Answer(seq) | AnswerAgain(seq) => {
                    if self.w.answer(seq, self.id(seq)).is_some() {
                        self.answer(seq, "result");
                    }
                }
                ConfirmFails(seq) => {
                    if self.w.fail(seq, self.id(seq)) {
                        self.answer(seq, "broker_unavailable");
                    }
                }
                PublishFails => self.fail_next_publish = true,
                Wait(ms) => {
                    self.now += Duration::from_millis(ms);
                    let over = self.w.overdue(self.now, GRACE);
                    for seq in over.published.into_iter().chain(over.waiting) {
                        self.answer(seq, "expired");
                    }
                }
                Close => {
                    for seq in self.w.drain() {
                        self.answer(seq, "shutting_down");
                    }
                }
            }
            // After each event the session promotes the waiting frame into a free slot.
            while let Some(p) = self.w.next_to_publish() {
                self.publish(p);
            }
            self.peak = self.peak.max(self.w.in_flight());
        }
    }

    /// Drive the window as the session does; return each seq's answers, in order, and the
    /// largest number of frames in flight at once.
    fn run(max_inflight: usize, events: &[Event]) -> (BTreeMap<u64, Vec<&'static str>>, usize) {
        let mut h = Harness {
            w: Window::new(max_inflight, DEADLINE),
            now: Instant::now(),
            answers: BTreeMap::new(),
            ids: HashMap::new(),
            fail_next_publish: false,
            peak: 0,
        };
        for event in events {
            h.on(*event);
        }
        (h.answers, h.peak)
    }

    /// Every seq sent got exactly one answer (duplicates of a seq still in the window get
    /// their own refusal, so they are checked apart).
    fn assert_one_answer_each(answers: &BTreeMap<u64, Vec<&'static str>>) {
        for (seq, got) in answers {
            let real: Vec<_> = got.iter().filter(|a| **a != "duplicate").collect();
            assert_eq!(real.len(), 1, "seq {seq} answered {got:?}");
        }
    }

    #[test]
    fn a_steady_stream_is_answered_in_order_within_the_window() {
        let mut events = Vec::new();
        for seq in 1..=20 {
            events.push(Frame(seq));
            events.push(Answer(seq));
        }
        events.push(Close);
        let (answers, peak) = run(2, &events);
        assert_one_answer_each(&answers);
        assert!(answers.values().all(|a| a == &["result"]));
        assert_eq!(peak, 1);
    }

    #[test]
    fn a_full_window_keeps_one_waiting_and_the_newest_wins() {
        // Two in flight, then three more before any answer: 3 and 4 are superseded in turn, 5
        // waits and is published when 1 is answered.
        let events = [
            Frame(1),
            Frame(2),
            Frame(3),
            Frame(4),
            Frame(5),
            Answer(1),
            Answer(2),
            Answer(5),
            Close,
        ];
        let (answers, peak) = run(2, &events);
        assert_one_answer_each(&answers);
        assert_eq!(answers[&3], ["superseded"]);
        assert_eq!(answers[&4], ["superseded"]);
        assert_eq!(answers[&5], ["result"]);
        assert_eq!(peak, 2, "never more than max_inflight in flight");
    }

    #[test]
    fn a_second_answer_for_one_frame_is_not_sent() {
        let events = [Frame(1), Answer(1), AnswerAgain(1), Frame(2), Close];
        let (answers, _) = run(2, &events);
        assert_eq!(answers[&1], ["result"]);
        assert_eq!(answers[&2], ["shutting_down"]);
    }

    #[test]
    fn a_reused_seq_is_refused_while_in_flight_and_a_stale_answer_is_ignored() {
        // seq 1 again while the first is in flight: refused. After the first is answered, a
        // new frame may reuse seq 1, and an answer for the old publish does not answer it.
        let events = [Frame(1), Frame(1), Answer(1), Frame(1), Close];
        let (answers, _) = run(2, &events);
        assert_eq!(answers[&1], ["duplicate", "result", "shutting_down"]);
    }

    #[test]
    fn overdue_frames_expire_once_and_a_late_answer_is_dropped() {
        let events = [
            Frame(1),
            Frame(2),
            Frame(3),
            // 3 waits. At 1.1 s, the waiting 3 is past its deadline; 1 and 2 get the grace.
            Wait(1100),
            // At 1.3 s, 1 and 2 expire too.
            Wait(200),
            Answer(1),
            Frame(4),
            Answer(4),
            Close,
        ];
        let (answers, _) = run(2, &events);
        assert_one_answer_each(&answers);
        assert_eq!(answers[&1], ["expired"]);
        assert_eq!(answers[&2], ["expired"]);
        assert_eq!(answers[&3], ["expired"]);
        assert_eq!(answers[&4], ["result"]);
    }

    #[test]
    fn failed_publishes_and_confirms_free_their_slot_for_the_waiting_frame() {
        let events = [
            Frame(1),
            Frame(2),
            Frame(3),
            // The broker refuses 1 after all: 3 takes its slot.
            ConfirmFails(1),
            // A confirm failure for a frame already answered changes nothing.
            Answer(2),
            ConfirmFails(2),
            PublishFails,
            Frame(4),
            Answer(3),
            Close,
        ];
        let (answers, peak) = run(2, &events);
        assert_one_answer_each(&answers);
        assert_eq!(answers[&1], ["broker_unavailable"]);
        assert_eq!(answers[&2], ["result"]);
        assert_eq!(answers[&3], ["result"]);
        assert_eq!(answers[&4], ["publish_failed"]);
        assert_eq!(peak, 2);
    }

    #[test]
    fn closing_answers_everything_left_in_ascending_order() {
        let mut w = Window::new(2, DEADLINE);
        let now = Instant::now();
        for seq in [7, 3, 9] {
            let p = Pending {
                seq,
                frame: ClientFrame {
                    seq: Some(seq),
                    captured_at_ms: None,
                    jpeg: Bytes::new(),
                },
                received: now,
                received_ms: 0,
            };
            if let Offer::Publish(p) = w.offer(p) {
                w.published(p, Uuid::now_v7());
            }
        }
        assert_eq!(w.drain(), vec![3, 7, 9]);
        assert_eq!(w.drain(), Vec::<u64>::new());
    }

    /// Long random sequences (fixed seeds): every frame is answered exactly once, and the
    /// window never holds more than max_inflight in flight.
    #[test]
    fn random_sequences_answer_every_frame_exactly_once() {
        use rand::{Rng as _, SeedableRng as _};
        for seed in 0..200u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let max_inflight = rng.random_range(1..=4);
            let mut next: u64 = 1;
            let mut events = Vec::new();
            for _ in 0..200 {
                let recent = next.saturating_sub(rng.random_range(1..=5)).max(1);
                events.push(match rng.random_range(0..10) {
                    0..=3 => {
                        // Sometimes a client reuses a recent seq.
                        let seq = if rng.random_bool(0.1) { recent } else { next };
                        next += 1;
                        Frame(seq)
                    }
                    4..=6 => Answer(recent),
                    7 => AnswerAgain(recent),
                    8 => {
                        if rng.random_bool(0.5) {
                            ConfirmFails(recent)
                        } else {
                            PublishFails
                        }
                    }
                    _ => Wait(rng.random_range(0..700)),
                });
            }
            events.push(Close);
            let (answers, peak) = run(max_inflight, &events);
            for (seq, got) in &answers {
                // A reused seq may legitimately be answered once per acceptance; what must
                // never happen is two answers for one acceptance, or none.
                let accepted = events
                    .iter()
                    .filter(|e| matches!(e, Frame(s) if s == seq))
                    .count();
                let real = got.iter().filter(|a| **a != "duplicate").count();
                let refused = got.len() - real;
                assert_eq!(
                    real + refused,
                    accepted,
                    "seed {seed}: seq {seq} sent {accepted} times, answered {got:?}"
                );
            }
            assert!(peak <= max_inflight, "seed {seed}: {peak} in flight");
        }
    }
}
