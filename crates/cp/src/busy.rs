//! Names (sandbox or host ids) with work in progress, each claimed by the task doing it until
//! its [`Claim`] is dropped: the lifecycle loop does not end a sandbox twice, the fleet loop
//! does not reconcile a host twice, and reconcile leaves a sandbox being created alone. And
//! [`Serial`]: the changes of one sandbox's state (the API's kill, pause, resume, connect and
//! timeouts, the lifecycle's actions, a resume by traffic) made one at a time, each on the
//! state the one before left.

use std::collections::{HashMap, HashSet};
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

/// One queue per name: [`Serial::turn`] waits for the turns taken before it to end.
#[derive(Debug, Clone, Default)]
pub struct Serial(Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>);

/// A name's turn in [`Serial`], until dropped.
#[derive(Debug)]
pub struct Turn {
    serial: Serial,
    name: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Serial {
    /// Waits for `name`'s earlier turns to end, then holds it.
    pub async fn turn(&self, name: &str) -> Turn {
        let queue = self
            .0
            .lock()
            .expect("serial lock")
            .entry(name.to_string())
            .or_default()
            .clone();
        let guard = queue.lock_owned().await;
        Turn {
            serial: self.clone(),
            name: name.to_string(),
            guard: Some(guard),
        }
    }

    /// How many names have a turn taken or awaited.
    pub fn len(&self) -> usize {
        self.0.lock().expect("serial lock").len()
    }

    /// Whether no name has a turn taken or awaited.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut queues = self.serial.0.lock().expect("serial lock");
        // Only the map holds it: nobody waits, and the name's entry goes.
        if queues
            .get(&self.name)
            .is_some_and(|queue| Arc::strong_count(queue) == 1)
        {
            queues.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_of_one_name_run_one_after_another_and_leave_nothing() {
        let serial = Serial::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = serial.turn("a").await;
        let waiting = {
            let (serial, order) = (serial.clone(), order.clone());
            tokio::spawn(async move {
                let _turn = serial.turn("a").await;
                order.lock().unwrap().push("second");
            })
        };
        // Another name does not wait for "a".
        drop(serial.turn("b").await);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        order.lock().unwrap().push("first");
        drop(first);
        waiting.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["first", "second"]);
        assert!(serial.is_empty());
    }

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
