//! Connections that have not authenticated yet: their own limits, overall and per source
//! address, so that anonymous sockets can never take the session slots that authenticated
//! clients need; and a per-source throttle on failed hellos, which also bounds the token
//! hashing an address can make the edge do.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most addresses remembered as throttled at once (the map's memory bound).
const MAX_PENALIZED: usize = 65_536;

pub(crate) struct Gate {
    total: Arc<Semaphore>,
    per_source: Arc<Mutex<HashMap<IpAddr, u32>>>,
    max_per_source: u32,
    failures: DefaultKeyedRateLimiter<IpAddr>,
    /// Addresses over their failure quota, and until when.
    penalized: Mutex<HashMap<IpAddr, Instant>>,
}

/// Why an unauthenticated connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `max_unauthenticated` connections are waiting for their hello already.
    Total,
    /// This address has `max_unauthenticated_per_source` waiting already.
    PerSource,
}

impl Refusal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::Total => "unauthenticated_limit",
            Refusal::PerSource => "unauthenticated_per_source",
        }
    }
}

/// Held by a connection until it authenticates (or ends): one of the overall places and one
/// of its address's.
pub(crate) struct Pending {
    _permit: OwnedSemaphorePermit,
    source: IpAddr,
    per_source: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut map = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.source);
            }
        }
    }
}

impl Gate {
    /// `failed_hellos_per_minute` failures per address are allowed (as a burst, refilling
    /// over the minute); past them the address is refused until the quota refills.
    pub(crate) fn new(
        max_total: usize,
        max_per_source: u32,
        failed_hellos_per_minute: u32,
    ) -> Self {
        let per_minute = NonZeroU32::new(failed_hellos_per_minute.max(1)).expect("max(1) > 0");
        Self {
            total: Arc::new(Semaphore::new(max_total)),
            per_source: Arc::new(Mutex::new(HashMap::new())),
            max_per_source,
            failures: RateLimiter::keyed(Quota::per_minute(per_minute)),
            penalized: Mutex::new(HashMap::new()),
        }
    }

    /// A place for a new connection from `source`, or why there is none.
    pub(crate) fn admit(&self, source: IpAddr) -> Result<Pending, Refusal> {
        let permit = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Total)?;
        let mut map = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            if *n == 0 {
                map.remove(&source);
            }
            return Err(Refusal::PerSource);
        }
        *n += 1;
        Ok(Pending {
            _permit: permit,
            source,
            per_source: self.per_source.clone(),
        })
    }

    /// True while `source` is over its failed-hello quota.
    pub(crate) fn throttled(&self, source: IpAddr) -> bool {
        let mut map = self.penalized.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&source) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                map.remove(&source);
                false
            }
            None => false,
        }
    }

    /// Record a failed hello from `source`; true when it has now used up its quota.
    pub(crate) fn failed(&self, source: IpAddr) -> bool {
        let Err(not_until) = self.failures.check_key(&source) else {
            return false;
        };
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        let mut map = self.penalized.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_PENALIZED {
            let now = Instant::now();
            map.retain(|_, until| *until > now);
        }
        if map.len() < MAX_PENALIZED {
            map.insert(source, Instant::now() + wait.max(Duration::from_secs(1)));
        }
        true
    }

    /// Forget the failure counts of addresses that have been quiet (a memory bound).
    pub(crate) fn prune(&self) {
        self.failures.retain_recent();
        let now = Instant::now();
        self.penalized
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, until| *until > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn places_are_limited_overall_and_per_source_and_come_back() {
        let gate = Gate::new(3, 2, 10);
        let a1 = gate.admit(ip(1)).unwrap();
        let _a2 = gate.admit(ip(1)).unwrap();
        assert_eq!(gate.admit(ip(1)).err(), Some(Refusal::PerSource));
        let _b1 = gate.admit(ip(2)).unwrap();
        assert_eq!(gate.admit(ip(3)).err(), Some(Refusal::Total));
        drop(a1);
        // The freed place serves another address, and the first address can come back.
        let _a3 = gate.admit(ip(1)).unwrap();
        assert_eq!(gate.admit(ip(4)).err(), Some(Refusal::Total));
    }

    #[test]
    fn failed_hellos_throttle_their_source_only() {
        let gate = Gate::new(10, 10, 3);
        assert!(!gate.failed(ip(1)) && !gate.failed(ip(1)) && !gate.failed(ip(1)));
        assert!(!gate.throttled(ip(1)));
        assert!(gate.failed(ip(1)), "the fourth failure within a minute");
        assert!(gate.throttled(ip(1)));
        assert!(!gate.throttled(ip(2)));
        gate.prune();
        assert!(gate.throttled(ip(1)), "still within its penalty");
    }
}
