//! Names (sandbox or host ids) with work in progress, each claimed by the task doing it until
//! its [`Claim`] is dropped: the lifecycle loop does not end a sandbox twice, the fleet loop
//! does not reconcile a host twice, and reconcile leaves a sandbox being created alone.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The names claimed now.
#[derive(Debug, Clone, Default)]
pub struct Busy(Arc<Mutex<HashSet<String>>>);

/// A name claimed in [`Busy`] until dropped.
#[derive(Debug)]
pub struct Claim(Busy, String);

impl Busy {
    /// Claims `name`, unless it is claimed already.
    pub fn claim(&self, name: &str) -> Option<Claim> {
        let fresh = self.0.lock().expect("busy lock").insert(name.to_string());
        fresh.then(|| Claim(self.clone(), name.to_string()))
    }

    /// Whether `name` is claimed now.
    pub fn contains(&self, name: &str) -> bool {
        self.0.lock().expect("busy lock").contains(name)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.0.lock().expect("busy lock").remove(&self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_claimed_once_until_released() {
        let busy = Busy::default();
        let claim = busy.claim("a").unwrap();
        assert!(busy.claim("a").is_none());
        assert!(busy.contains("a") && !busy.contains("b"));
        drop(claim);
        assert!(busy.claim("a").is_some());
    }
}
