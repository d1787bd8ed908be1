//! Token checks off the async runtime, below it in priority. Argon2 is deliberately costly
//! (tens of milliseconds of CPU per hello), so a burst of hellos, valid or not, could starve the
//! tasks that relay frames and results. The checks run on their own threads, one per core, at
//! a lower scheduling priority (nice 10 on Linux): they use the CPU the edge leaves idle. A check
//! that has not started by its hello deadline is not run at all, and the queue is bounded.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::directory::{self, AuthError, ClientRecord, ClientStore, Credential};

/// Why a hello was not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotChecked {
    /// The queue was full, or the check could not start before the hello deadline.
    Busy,
}

struct Job {
    store: Arc<dyn ClientStore>,
    client_id: String,
    credential: Credential,
    deadline: Instant,
    reply: oneshot::Sender<Result<Result<ClientRecord, AuthError>, NotChecked>>,
}

pub(crate) struct TokenChecker {
    jobs: SyncSender<Job>,
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
    /// `threads` checker threads, and room for `queue` hellos waiting for one.
    pub(crate) fn start(threads: usize, queue: usize) -> Self {
        let (jobs, rx) = sync_channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            std::thread::Builder::new()
                .name(format!("token-check-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                            Ok(job) => job,
                            // Every sender is gone: the edge has stopped.
                            Err(_) => return,
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
        Self { jobs }
    }

    /// Check a hello's credential; `Err(Busy)` when the check could not start by `deadline`.
    pub(crate) async fn check(
        &self,
        store: Arc<dyn ClientStore>,
        client_id: String,
        credential: Credential,
        deadline: Instant,
    ) -> Result<Result<ClientRecord, AuthError>, NotChecked> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            store,
            client_id,
            credential,
            deadline,
            reply,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                return Err(NotChecked::Busy);
            }
        }
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
            )
            .await;
        assert!(matches!(ok, Ok(Ok(r)) if r.id == "alice"));
        let wrong = checker
            .check(
                store.clone(),
                "alice".into(),
                Credential::Token("wrong-token".into()),
                soon,
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
}
