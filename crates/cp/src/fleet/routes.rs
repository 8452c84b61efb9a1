//! The proxy's route cache: which host each running sandbox is on, and its traffic token, read
//! from the store on a miss and kept until the sandbox is paused, killed or lost.
//!
//! A route read from the store while the sandbox is being paused or killed would, cached after
//! the change, outlive it: traffic would keep going to the old host (a paused sandbox with
//! `autoResume` would never be resumed; a host back from the dead would be sent traffic for a
//! sandbox the store has dropped). So a pause or kill holds the sandbox's route out of the
//! cache until the store has the change ([`RouteCache::hold`]), every forget is counted, and a
//! route read before a forget that happened while it was being read is used for its request
//! but not kept. Among replicas, a change made by another replica is not forgotten here: each
//! route is then kept for a short life only ([`RouteCache::set_life`]).

use std::collections::HashMap;
use std::sync::Mutex;

/// Where a sandbox runs, for the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedRoute {
    pub host_id: String,
    pub traffic_token: Option<String>,
    /// The `Host` its ports' requests carry (`${PORT}` is the port), when it has a mask.
    pub host_mask: Option<String>,
}

/// How many routes the cache holds before it starts again empty.
const MOST_ROUTES: usize = 100_000;

#[derive(Debug, Default)]
struct Routes {
    /// Each route, and when it was kept.
    by_sandbox: HashMap<String, (CachedRoute, std::time::Instant)>,
    /// Forgets so far: a route may be kept only if none came while it was being read.
    forgets: u64,
    /// Sandboxes being changed (paused, killed), and by how many changes: their routes are
    /// read from the store for every request, and never kept, until the change is stored.
    held: HashMap<String, u32>,
}

impl Routes {
    fn forget(&mut self, sandbox_id: &str) {
        self.forgets += 1;
        self.by_sandbox.remove(sandbox_id);
    }
}

/// A sandbox's route held uncached for the length of a change (see [`RouteCache::hold`]).
#[derive(Debug)]
pub struct RouteHold<'a> {
    cache: &'a RouteCache,
    sandbox_id: String,
}

impl Drop for RouteHold<'_> {
    fn drop(&mut self) {
        let mut routes = self.cache.lock();
        if let Some(count) = routes.held.get_mut(&self.sandbox_id) {
            *count -= 1;
            if *count == 0 {
                routes.held.remove(&self.sandbox_id);
            }
        }
        routes.forget(&self.sandbox_id);
    }
}

/// The cache (see the module's documentation).
#[derive(Debug, Default)]
pub struct RouteCache {
    routes: Mutex<Routes>,
    /// How long a route is kept (none: until forgotten).
    life: Option<std::time::Duration>,
}

/// A cache miss's ticket: taken before the route is read from the store, handed back with it.
#[derive(Debug, Clone, Copy)]
pub struct Miss {
    forgets_before: u64,
}

impl RouteCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().expect("route cache lock")
    }

    /// Holds `sandbox_id`'s route out of the cache until the returned hold is dropped: hold it
    /// before a change of the sandbox reaches its host, and drop it once the store has the
    /// change. Until then every request reads the store; after it, none finds a route read
    /// before the change.
    pub fn hold(&self, sandbox_id: &str) -> RouteHold<'_> {
        let mut routes = self.lock();
        *routes.held.entry(sandbox_id.to_string()).or_default() += 1;
        routes.forget(sandbox_id);
        RouteHold {
            cache: self,
            sandbox_id: sandbox_id.to_string(),
        }
    }

    /// Keeps each route `life` at most (replicas: another's changes are not forgotten here).
    pub fn set_life(&mut self, life: std::time::Duration) {
        self.life = Some(life);
    }

    /// The cached route of `sandbox_id`, or the ticket to read it with.
    pub fn get(&self, sandbox_id: &str) -> Result<CachedRoute, Miss> {
        let routes = self.lock();
        if routes.held.contains_key(sandbox_id) {
            return Err(Miss {
                forgets_before: routes.forgets,
            });
        }
        match routes.by_sandbox.get(sandbox_id) {
            Some((route, kept)) if self.life.is_none_or(|life| kept.elapsed() < life) => {
                Ok(route.clone())
            }
            _ => Err(Miss {
                forgets_before: routes.forgets,
            }),
        }
    }

    /// Keeps a route read from the store after `miss`, unless something was forgotten since
    /// (it may be this sandbox, paused or killed while the route was read). Whether it was kept.
    pub fn keep(&self, sandbox_id: &str, route: CachedRoute, miss: Miss) -> bool {
        let mut routes = self.lock();
        if routes.forgets != miss.forgets_before || routes.held.contains_key(sandbox_id) {
            return false;
        }
        if routes.by_sandbox.len() >= MOST_ROUTES {
            routes.by_sandbox.clear();
        }
        routes
            .by_sandbox
            .insert(sandbox_id.to_string(), (route, std::time::Instant::now()));
        true
    }

    /// Forgets a sandbox's route (it was paused, killed or lost).
    pub fn forget(&self, sandbox_id: &str) {
        self.lock().forget(sandbox_id);
    }

    /// Forgets the routes to every sandbox on `host_id` (it went down, or was forgotten).
    pub fn forget_host(&self, host_id: &str) {
        let mut routes = self.lock();
        routes.forgets += 1;
        routes
            .by_sandbox
            .retain(|_, (route, _)| route.host_id != host_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(host_id: &str) -> CachedRoute {
        CachedRoute {
            host_id: host_id.into(),
            traffic_token: None,
            host_mask: None,
        }
    }

    #[test]
    fn a_route_read_while_something_was_forgotten_is_not_kept() {
        let cache = RouteCache::default();
        let miss = cache.get("a").unwrap_err();
        // The sandbox is paused while its route is read from the store.
        cache.forget("a");
        assert!(!cache.keep("a", on("h1"), miss));
        assert!(
            cache.get("a").is_err(),
            "the next request reads the store again"
        );

        let miss = cache.get("a").unwrap_err();
        assert!(cache.keep("a", on("h1"), miss));
        assert_eq!(cache.get("a").unwrap(), on("h1"));
    }

    #[test]
    fn a_host_going_down_forgets_its_routes_and_those_being_read() {
        let cache = RouteCache::default();
        for (sandbox, host) in [("a", "h1"), ("b", "h2")] {
            let miss = cache.get(sandbox).unwrap_err();
            assert!(cache.keep(sandbox, on(host), miss));
        }
        let reading = cache.get("c").unwrap_err();
        cache.forget_host("h1");
        assert!(cache.get("a").is_err());
        assert_eq!(cache.get("b").unwrap(), on("h2"));
        assert!(!cache.keep("c", on("h1"), reading));
    }

    #[test]
    fn a_held_route_is_never_served_from_the_cache_nor_kept() {
        let cache = RouteCache::default();
        let miss = cache.get("a").unwrap_err();
        assert!(cache.keep("a", on("h1"), miss));
        let hold = cache.hold("a");
        let second = cache.hold("a");
        assert!(cache.get("a").is_err(), "held: read from the store");
        let miss = cache.get("a").unwrap_err();
        assert!(!cache.keep("a", on("h1"), miss), "held: not kept");
        drop(hold);
        let miss = cache.get("a").unwrap_err();
        assert!(
            !cache.keep("a", on("h1"), miss),
            "still held by the second change"
        );
        drop(second);
        assert!(
            cache.get("a").is_err(),
            "a release forgets what was read meanwhile"
        );
        let miss = cache.get("a").unwrap_err();
        assert!(cache.keep("a", on("h2"), miss));
        assert_eq!(cache.get("a").unwrap(), on("h2"));
    }

    #[test]
    fn a_full_cache_starts_again() {
        let cache = RouteCache::default();
        for n in 0..=MOST_ROUTES {
            let id = n.to_string();
            let miss = cache.get(&id).unwrap_err();
            cache.keep(&id, on("h"), miss);
        }
        assert_eq!(cache.lock().by_sandbox.len(), 1);
    }
}
