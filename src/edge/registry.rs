//! The edge's live sessions by client id, and each session's place in it.
//!
//! A session takes its place with [`Registry::register`] and holds a [`Registration`], which
//! gives the place back when it is dropped: however the session ends, by returning early, by an
//! error, or by a panic that unwinds its task. Only the session that holds a place removes it; a
//! newer session of the same client, which replaced it, keeps its own. The
//! `vigil_edge_sessions_active` gauge counts registrations, so it cannot drift either.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus::IntGauge;

/// What the registry needs of an entry: which session it belongs to.
pub(crate) trait Place {
    fn session(&self) -> u64;
}

impl Place for super::SessionEntry {
    fn session(&self) -> u64 {
        self.session
    }
}

/// Live sessions by client id, one per client.
#[derive(Debug)]
pub(crate) struct Registry<E> {
    map: Mutex<HashMap<String, E>>,
    active: IntGauge,
}

impl<E: Place> Registry<E> {
    pub(crate) fn new(active: IntGauge) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            active,
        }
    }

    /// The sessions, locked. A panic while the lock was held leaves the map as it was (every
    /// change to it is one insert or one remove), so a poisoned lock is taken as it is.
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<String, E>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take `client_id`'s place for `entry`'s session. Returns the registration, which gives
    /// the place back when dropped, and the entry this one replaced (one session per client:
    /// the newer wins, and the caller closes the older).
    pub(crate) fn register(
        self: &Arc<Self>,
        client_id: &str,
        entry: E,
    ) -> (Registration<E>, Option<E>) {
        let session = entry.session();
        let older = self.lock().insert(client_id.to_owned(), entry);
        self.active.inc();
        let registration = Registration {
            registry: self.clone(),
            client_id: client_id.to_owned(),
            session,
        };
        (registration, older)
    }
}

/// A session's place in the [`Registry`], given back on drop.
#[derive(Debug)]
pub(crate) struct Registration<E: Place> {
    registry: Arc<Registry<E>>,
    client_id: String,
    session: u64,
}

impl<E: Place> Drop for Registration<E> {
    fn drop(&mut self) {
        {
            let mut sessions = self.registry.lock();
            if sessions
                .get(&self.client_id)
                .is_some_and(|e| e.session() == self.session)
            {
                sessions.remove(&self.client_id);
            }
        }
        self.registry.active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Entry(u64);

    impl Place for Entry {
        fn session(&self) -> u64 {
            self.0
        }
    }

    fn registry() -> Arc<Registry<Entry>> {
        Arc::new(Registry::new(
            IntGauge::new("sessions_active", "test").expect("a valid gauge"),
        ))
    }

    #[test]
    fn a_session_that_ends_gives_its_place_back() {
        let r = registry();
        let (place, older) = r.register("alice", Entry(1));
        assert_eq!(older, None);
        assert_eq!((r.lock().len(), r.active.get()), (1, 1));
        drop(place);
        assert_eq!((r.lock().len(), r.active.get()), (0, 0));
    }

    #[test]
    fn a_replaced_session_leaves_its_successors_place_alone() {
        let r = registry();
        let (first, _) = r.register("alice", Entry(1));
        let (second, older) = r.register("alice", Entry(2));
        assert_eq!(older, Some(Entry(1)), "the caller closes the older session");
        assert_eq!(r.active.get(), 2, "both sessions are still running");
        drop(first);
        assert_eq!(r.lock().get("alice"), Some(&Entry(2)));
        assert_eq!(r.active.get(), 1);
        drop(second);
        assert!(r.lock().is_empty());
        assert_eq!(r.active.get(), 0);
    }

    #[test]
    fn a_session_that_panics_gives_its_place_back() {
        let r = registry();
        let (place, _) = r.register("alice", Entry(1));
        let (other, _) = r.register("bob", Entry(2));
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _place = place;
            panic!("a bug in the session");
        }));
        assert!(unwound.is_err());
        assert_eq!(r.lock().keys().collect::<Vec<_>>(), ["bob"]);
        assert_eq!(r.active.get(), 1);
        drop(other);
        assert_eq!(r.active.get(), 0);
    }

    #[tokio::test]
    async fn a_session_task_that_panics_gives_its_place_back() {
        let r = registry();
        let (place, _) = r.register("alice", Entry(1));
        let task = tokio::spawn(async move {
            let _place = place;
            tokio::task::yield_now().await;
            panic!("a bug in the session");
        });
        assert!(task.await.expect_err("the task panicked").is_panic());
        assert!(r.lock().is_empty());
        assert_eq!(r.active.get(), 0);
    }
}
