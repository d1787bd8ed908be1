//! Token checks off the async runtime, below it in priority. Argon2 is deliberately costly
//! (tens of milliseconds of CPU per hello), so a burst of hellos, valid or not, could starve the
//! tasks that relay frames and results. The checks run on their own threads, one per core, at
//! a lower scheduling priority (nice 10 on Linux): they use the CPU the edge leaves idle. A check
//! that has not started by its hello deadline is not run at all, and the queues are bounded.
//!
//! Two queues: hellos for ids with no recent failures go first, those for suspect ids
//! ([`super::gate::IdBudget::suspect`]) only when no honest one waits. Wrong tokens sent for
//! one id from many addresses then queue behind each other, not in front of honest clients.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::directory::{self, AuthError, ClientRecord, ClientStore, Credential};

/// Why a hello was not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotChecked {
    /// The queue was full, or the check could not start before the hello deadline.
    Busy,
}

/// Which queue a check waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Priority {
    /// No recent failures for this id.
    Honest,
    /// This id failed recently.
    Suspect,
}

struct Job {
    store: Arc<dyn ClientStore>,
    client_id: String,
    credential: Credential,
    deadline: Instant,
    reply: oneshot::Sender<Result<Result<ClientRecord, AuthError>, NotChecked>>,
}

#[derive(Default)]
struct Queues {
    honest: VecDeque<Job>,
    suspect: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    queues: Mutex<Queues>,
    ready: Condvar,
    capacity: usize,
}

pub(crate) struct TokenChecker {
    shared: Arc<Shared>,
}

impl Drop for TokenChecker {
    fn drop(&mut self) {
        self.shared
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.ready.notify_all();
    }
}

/// Lower this thread's scheduling priority, so that it only uses CPU nothing else wants.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid has no preconditions; setpriority on our own thread id only changes this
    // thread's nice value, and its failure is harmless (the thread keeps the normal priority).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

impl TokenChecker {
    /// `threads` checker threads, and room for `queue` hellos waiting in each queue.
    pub(crate) fn start(threads: usize, queue: usize) -> Self {
        let checker = Self::idle(queue);
        checker.run(threads.max(1));
        checker
    }

    /// Queues with no thread taking from them yet.
    fn idle(queue: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                queues: Mutex::new(Queues::default()),
                ready: Condvar::new(),
                capacity: queue.max(1),
            }),
        }
    }

    /// Start `threads` threads taking checks from the queues.
    fn run(&self, threads: usize) {
        for i in 0..threads {
            let shared = self.shared.clone();
            std::thread::Builder::new()
                .name(format!("token-check-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        let job = {
                            let mut q = shared.queues.lock().unwrap_or_else(|e| e.into_inner());
                            loop {
                                if let Some(job) =
                                    q.honest.pop_front().or_else(|| q.suspect.pop_front())
                                {
                                    break job;
                                }
                                // The checker is gone: the edge has stopped.
                                if q.closed {
                                    return;
                                }
                                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                            }
                        };
                        if Instant::now() >= job.deadline || job.reply.is_closed() {
                            let _ = job.reply.send(Err(NotChecked::Busy));
                            continue;
                        }
                        let outcome =
                            directory::authenticate(&*job.store, &job.client_id, &job.credential);
                        let _ = job.reply.send(Ok(outcome));
                    }
                })
                .expect("a token-check thread starts");
        }
    }

    /// Checks waiting, honest and suspect.
    #[cfg(test)]
    fn waiting(&self) -> (usize, usize) {
        let q = self.shared.queues.lock().unwrap();
        (q.honest.len(), q.suspect.len())
    }

    /// Check a hello's credential; `Err(Busy)` when its queue is full or the check could not
    /// start by `deadline`.
    pub(crate) async fn check(
        &self,
        store: Arc<dyn ClientStore>,
        client_id: String,
        credential: Credential,
        deadline: Instant,
        priority: Priority,
    ) -> Result<Result<ClientRecord, AuthError>, NotChecked> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            store,
            client_id,
            credential,
            deadline,
            reply,
        };
        {
            let mut q = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner());
            let queue = match priority {
                Priority::Honest => &mut q.honest,
                Priority::Suspect => &mut q.suspect,
            };
            if queue.len() >= self.shared.capacity {
                return Err(NotChecked::Busy);
            }
            queue.push_back(job);
        }
        self.shared.ready.notify_one();
        answer.await.unwrap_or(Err(NotChecked::Busy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::FolderStore;
    use std::time::Duration;

    fn store() -> Arc<dyn ClientStore> {
        let dir = std::env::temp_dir().join(format!("vigil-tokens-{:08x}", rand::random::<u32>()));
        let store = FolderStore::open(&dir).unwrap();
        store
            .put(&ClientRecord::new("alice", "Alice", "alice-token-123").unwrap())
            .unwrap();
        Arc::new(store)
    }

    #[tokio::test]
    async fn checks_tokens_and_refuses_what_cannot_start_in_time() {
        let checker = TokenChecker::start(1, 4);
        let store = store();
        let soon = Instant::now() + Duration::from_secs(10);
        let ok = checker
            .check(
                store.clone(),
                "alice".into(),
                Credential::Token("alice-token-123".into()),
                soon,
                Priority::Honest,
            )
            .await;
        assert!(matches!(ok, Ok(Ok(r)) if r.id == "alice"));
        let wrong = checker
            .check(
                store.clone(),
                "alice".into(),
                Credential::Token("wrong-token".into()),
                soon,
                Priority::Honest,
            )
            .await;
        assert!(matches!(wrong, Ok(Err(AuthError::Unauthorized))));
        // A hello whose deadline has passed is not checked at all.
        let late = checker
            .check(
                store.clone(),
                "alice".into(),
                Credential::Token("alice-token-123".into()),
                Instant::now(),
                Priority::Honest,
            )
            .await;
        assert_eq!(late.err(), Some(NotChecked::Busy));
    }

    #[tokio::test]
    async fn a_full_queue_answers_busy_at_once() {
        // One thread, room for one waiting check: of many at once, some are turned away.
        let checker = Arc::new(TokenChecker::start(1, 1));
        let store = store();
        let soon = Instant::now() + Duration::from_secs(30);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (checker, store) = (checker.clone(), store.clone());
                tokio::spawn(async move {
                    checker
                        .check(
                            store,
                            "alice".into(),
                            Credential::Token("alice-token-123".into()),
                            soon,
                            Priority::Honest,
                        )
                        .await
                })
            })
            .collect();
        let mut busy = 0;
        for t in tasks {
            if t.await.unwrap() == Err(NotChecked::Busy) {
                busy += 1;
            }
        }
        assert!(busy > 0, "a bounded queue turned no one away");
    }

    #[tokio::test]
    async fn honest_hellos_go_before_suspect_ones() {
        // Suspects queue first, then one honest hello; the one thread starts only then, and
        // checks the honest one before every suspect.
        let checker = Arc::new(TokenChecker::idle(64));
        let store = store();
        let soon = Instant::now() + Duration::from_secs(60);
        let order = Arc::new(Mutex::new(Vec::new()));
        let spawn = |name: &'static str, priority: Priority| {
            let (checker, store, order) = (checker.clone(), store.clone(), order.clone());
            tokio::spawn(async move {
                let token = if name == "honest" {
                    "alice-token-123"
                } else {
                    "wrong"
                };
                let out = checker
                    .check(
                        store,
                        "alice".into(),
                        Credential::Token(token.into()),
                        soon,
                        priority,
                    )
                    .await;
                order.lock().unwrap().push(name);
                out
            })
        };
        let suspects: Vec<_> = (0..4)
            .map(|_| spawn("suspect", Priority::Suspect))
            .collect();
        while checker.waiting() != (0, 4) {
            tokio::task::yield_now().await;
        }
        let honest = spawn("honest", Priority::Honest);
        while checker.waiting() != (1, 4) {
            tokio::task::yield_now().await;
        }
        checker.run(1);
        assert!(matches!(honest.await.unwrap(), Ok(Ok(_))));
        for s in suspects {
            assert!(matches!(s.await.unwrap(), Ok(Err(AuthError::Unauthorized))));
        }
        assert_eq!(order.lock().unwrap()[0], "honest");
        // Each queue is bounded on its own: a full suspect queue turns suspects away at once,
        // and honest hellos still find a place.
        let small = Arc::new(TokenChecker::idle(1));
        let queue = |priority: Priority| {
            let (small, store) = (small.clone(), store.clone());
            tokio::spawn(async move {
                small
                    .check(
                        store,
                        "alice".into(),
                        Credential::Token("x".into()),
                        soon,
                        priority,
                    )
                    .await
            })
        };
        let waiting = queue(Priority::Suspect);
        while small.waiting() != (0, 1) {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            queue(Priority::Suspect).await.unwrap().err(),
            Some(NotChecked::Busy)
        );
        let honest = queue(Priority::Honest);
        while small.waiting() != (1, 1) {
            tokio::task::yield_now().await;
        }
        waiting.abort();
        honest.abort();
    }
}
