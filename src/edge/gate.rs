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
/// of its address's (once its address is known: behind a trusted proxy, after the PROXY
/// header).
pub(crate) struct Pending {
    _permit: OwnedSemaphorePermit,
    source: Option<IpAddr>,
    per_source: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(source) = self.source else { return };
        let mut map = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                map.remove(&source);
            }
        }
    }
}

/// The key an address is limited under: an IPv4 address (also IPv4-mapped), or an IPv6
/// address's /64, which one subscriber usually holds whole: counting each of its addresses
/// apart would give one client 2^64 quotas.
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match super::proxy::canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
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
        self.place(self.admit_unplaced()?, source)
    }

    /// One of the overall places only, for a connection from a trusted proxy whose client's
    /// address comes in its PROXY header; [`Gate::place`] counts it then.
    pub(crate) fn admit_unplaced(&self) -> Result<Pending, Refusal> {
        let permit = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Total)?;
        Ok(Pending {
            _permit: permit,
            source: None,
            per_source: self.per_source.clone(),
        })
    }

    /// Count `pending` against `source`'s places (once; a placed connection stays placed).
    pub(crate) fn place(&self, mut pending: Pending, source: IpAddr) -> Result<Pending, Refusal> {
        if pending.source.is_some() {
            return Ok(pending);
        }
        let source = source_key(source);
        let mut map = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            if *n == 0 {
                map.remove(&source);
            }
            return Err(Refusal::PerSource);
        }
        *n += 1;
        pending.source = Some(source);
        Ok(pending)
    }

    /// True while `source` is over its failed-hello quota.
    pub(crate) fn throttled(&self, source: IpAddr) -> bool {
        let source = source_key(source);
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
        let source = source_key(source);
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

/// Most client ids with failures (or checks in flight) remembered at once (the map's memory
/// bound).
const MAX_IDS: usize = 65_536;

/// Failures within this long of the last one make an id a suspect.
const SUSPECT_FOR: Duration = Duration::from_secs(900);

/// Failed hellos per client id, beside the per-address throttle: many addresses guessing one
/// id's token are stopped by the id's own budget. Past `allowed` failures in a row, the id's
/// token hellos are refused, before any hashing, for `base` doubled with each further failure
/// up to `max`; a success forgets its failures. Checks in flight count too: an id may have at
/// most its remaining budget (at least one) being hashed at once, so a burst of hellos sent
/// together cannot all slip past the lock before the first fails. Unknown ids are counted the
/// same way, so the budget does not tell which ids exist. Session tokens are not held up by
/// it: a candidate whose id is under attack still gets in with one from the exam platform.
pub(crate) struct IdBudget {
    allowed: u32,
    base: Duration,
    max: Duration,
    state: Mutex<IdMap>,
}

struct IdMap {
    ids: HashMap<String, IdFailures>,
    /// When a full map was last swept of quiet ids (at most once a second).
    swept: Instant,
}

#[derive(Debug, Clone, Copy)]
struct IdFailures {
    count: u32,
    last: Instant,
    locked_until: Option<Instant>,
    /// Checks of this id's hellos in flight.
    pending: u32,
}

impl IdFailures {
    fn quiet(&self, now: Instant) -> bool {
        self.pending == 0
            && self.last.elapsed() >= SUSPECT_FOR
            && self.locked_until.is_none_or(|u| u <= now)
    }
}

/// A token check of one id's hello in flight ([`IdBudget::begin`]); ends when dropped.
pub(crate) struct IdAttempt<'a> {
    budget: &'a IdBudget,
    /// `None` when the map was full and the attempt is not tracked.
    id: Option<String>,
}

impl Drop for IdAttempt<'_> {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        let mut state = self.budget.lock();
        if let Some(f) = state.ids.get_mut(&id) {
            f.pending = f.pending.saturating_sub(1);
            if f.pending == 0 && f.count == 0 {
                state.ids.remove(&id);
            }
        }
    }
}

impl IdBudget {
    pub(crate) fn new(allowed: u32, base: Duration, max: Duration) -> Self {
        Self {
            allowed: allowed.max(1),
            base,
            max: max.max(base),
            state: Mutex::new(IdMap {
                ids: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IdMap> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Room in a full map for one more id: quiet ids are swept out, at most once a second.
    fn room(state: &mut IdMap, now: Instant) -> bool {
        if state.ids.len() < MAX_IDS {
            return true;
        }
        if state.swept.elapsed() >= Duration::from_secs(1) {
            state.swept = now;
            state.ids.retain(|_, f| !f.quiet(now));
        }
        state.ids.len() < MAX_IDS
    }

    /// Start checking a token hello for `id`: `Err` with the time left when the id is locked
    /// out, or has as many checks in flight as its remaining budget.
    pub(crate) fn begin(&self, id: &str) -> Result<IdAttempt<'_>, Duration> {
        let now = Instant::now();
        let mut state = self.lock();
        if !state.ids.contains_key(id) && !Self::room(&mut state, now) {
            // Full of ids failing now: this one goes untracked (and counts as a suspect).
            return Ok(IdAttempt {
                budget: self,
                id: None,
            });
        }
        let f = state.ids.entry(id.to_owned()).or_insert(IdFailures {
            count: 0,
            last: now,
            locked_until: None,
            pending: 0,
        });
        if let Some(left) = f
            .locked_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|left| !left.is_zero())
        {
            return Err(left);
        }
        let in_flight = self.allowed.saturating_sub(f.count).max(1);
        if f.pending >= in_flight {
            return Err(self.base);
        }
        f.pending += 1;
        Ok(IdAttempt {
            budget: self,
            id: Some(id.to_owned()),
        })
    }

    /// Whether `id` failed recently (or cannot be tracked): its hellos wait behind those of
    /// ids that did not.
    pub(crate) fn suspect(&self, id: &str) -> bool {
        let state = self.lock();
        match state.ids.get(id) {
            Some(f) => f.count > 0 && f.last.elapsed() < SUSPECT_FOR,
            None => state.ids.len() >= MAX_IDS,
        }
    }

    /// Record a failed hello for `id`; how long it is now locked out, if it is.
    pub(crate) fn failed(&self, id: &str) -> Option<Duration> {
        let now = Instant::now();
        let mut state = self.lock();
        if !state.ids.contains_key(id) && !Self::room(&mut state, now) {
            return None;
        }
        let f = state.ids.entry(id.to_owned()).or_insert(IdFailures {
            count: 0,
            last: now,
            locked_until: None,
            pending: 0,
        });
        // A budget used up long ago starts over.
        if f.last.elapsed() >= SUSPECT_FOR && f.locked_until.is_none_or(|u| u <= now) {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        if f.count < self.allowed {
            return None;
        }
        let doublings = (f.count - self.allowed).min(31);
        let lock = self.base.saturating_mul(1 << doublings).min(self.max);
        f.locked_until = Some(now + lock);
        Some(lock)
    }

    /// A hello for `id` succeeded: its failures are forgotten.
    pub(crate) fn succeeded(&self, id: &str) {
        if let Some(f) = self.lock().ids.get_mut(id) {
            f.count = 0;
            f.locked_until = None;
        }
    }

    /// Forget ids that have been quiet and are not locked (a memory bound).
    pub(crate) fn prune(&self) {
        let now = Instant::now();
        self.lock().ids.retain(|_, f| !f.quiet(now));
    }

    /// How long `id` is still locked out, if it is (tests).
    #[cfg(test)]
    fn locked(&self, id: &str) -> Option<Duration> {
        let now = Instant::now();
        self.lock()
            .ids
            .get(id)
            .and_then(|f| f.locked_until)
            .and_then(|until| until.checked_duration_since(now))
            .filter(|left| !left.is_zero())
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
    fn an_ipv6_slash_64_is_one_source_and_a_proxied_connection_is_placed_by_its_client() {
        let gate = Gate::new(10, 2, 3);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _a = gate.admit(a).unwrap();
        let _b = gate.admit(b).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Refusal::PerSource), "same /64");
        let _o = gate.admit(other).unwrap();
        for _ in 0..4 {
            gate.failed(a);
        }
        assert!(gate.throttled(b), "the /64 shares one failed-hello quota");
        assert!(!gate.throttled(other));
        // Behind a proxy: counted by the client's address, not the proxy's.
        let client = ip(7);
        let p1 = gate.place(gate.admit_unplaced().unwrap(), client).unwrap();
        let _p2 = gate.place(gate.admit_unplaced().unwrap(), client).unwrap();
        assert_eq!(
            gate.place(gate.admit_unplaced().unwrap(), client).err(),
            Some(Refusal::PerSource)
        );
        drop(p1);
        assert!(gate.place(gate.admit_unplaced().unwrap(), client).is_ok());
        assert_eq!(source_key("::ffff:10.0.0.7".parse().unwrap()), client);
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

#[cfg(test)]
mod id_budget_tests {
    use super::*;

    #[test]
    fn an_id_is_locked_out_exponentially_after_its_budget_and_a_success_forgets() {
        let budget = IdBudget::new(3, Duration::from_secs(1), Duration::from_secs(8));
        assert!(!budget.suspect("alice"));
        assert_eq!(budget.failed("alice"), None);
        assert!(budget.suspect("alice"), "one failure makes a suspect");
        assert_eq!(budget.locked("alice"), None);
        assert_eq!(budget.failed("alice"), None);
        // The third failure locks it for the base, each one after doubles it, up to the cap.
        assert_eq!(budget.failed("alice"), Some(Duration::from_secs(1)));
        assert!(budget.begin("alice").is_err(), "a locked id is checked");
        assert_eq!(budget.failed("alice"), Some(Duration::from_secs(2)));
        assert_eq!(budget.failed("alice"), Some(Duration::from_secs(4)));
        assert_eq!(budget.failed("alice"), Some(Duration::from_secs(8)));
        for _ in 0..100 {
            assert_eq!(budget.failed("alice"), Some(Duration::from_secs(8)));
        }
        // Other ids, known or not, are untouched.
        assert!(budget.begin("bob").is_ok());
        assert!(!budget.suspect("bob"));
        budget.succeeded("alice");
        assert_eq!(budget.locked("alice"), None);
        assert!(!budget.suspect("alice"));
        assert!(budget.begin("alice").is_ok());
    }

    #[test]
    fn checks_in_flight_are_bounded_by_the_remaining_budget() {
        let budget = IdBudget::new(3, Duration::from_secs(1), Duration::from_secs(8));
        // An honest id: up to its whole budget at once.
        let held: Vec<_> = (0..3).map(|_| budget.begin("alice").unwrap()).collect();
        assert!(budget.begin("alice").is_err());
        drop(held);
        // After two failures one check at a time: a burst sent together cannot all be hashed
        // before the lock falls.
        budget.failed("alice");
        budget.failed("alice");
        let one = budget.begin("alice").unwrap();
        assert!(budget.begin("alice").is_err());
        drop(one);
        assert!(budget.begin("alice").is_ok());
    }

    #[test]
    fn a_full_map_makes_new_ids_suspects_and_keeps_counting_known_ones() {
        let budget = IdBudget::new(2, Duration::from_secs(1), Duration::from_secs(2));
        for i in 0..MAX_IDS + 10 {
            budget.failed(&format!("id-{i}"));
        }
        assert_eq!(budget.lock().ids.len(), MAX_IDS);
        assert!(
            budget.suspect("a-new-id"),
            "an untracked id is not treated as honest"
        );
        // Ids already known still count.
        budget.failed("id-0");
        assert!(budget.locked("id-0").is_some());
    }
}
