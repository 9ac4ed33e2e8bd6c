//! The resolver thread: resolves the DNS names of upstream servers again as their records'
//! TTLs run out (`upstream::dns`, a stub resolver that sees TTLs), and sends each answer to the
//! main thread, which publishes the pools with their new addresses (`Reloader::resolved`).
//!
//! A name that no longer exists (NXDOMAIN, or no address) leaves its pools; a name whose
//! resolution fails (no answer, a server failure) keeps its last addresses and is tried again
//! in [`RETRY`]: a DNS outage must not empty a pool.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::upstream::dns::{resolve, DnsError, Resolved, ResolverConfig};

/// How soon a failed resolution is tried again.
pub const RETRY: Duration = Duration::from_secs(5);
/// How often the thread looks at what is due (and whether to stop).
const ROUND: Duration = Duration::from_millis(100);

/// A name's answer, for the main thread.
pub type Answer = (String, Result<Resolved, DnsError>);

/// The running resolver thread; it stops when dropped.
#[derive(Debug)]
pub struct Resolver {
    names: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Resolver {
    /// Starts the thread, resolving the names of `due` through `config` when each is due
    /// (as start-up's answers said), then on their TTLs; answers go to `answers`.
    pub fn spawn(
        config: ResolverConfig,
        due: HashMap<String, Instant>,
        answers: Sender<Answer>,
    ) -> std::io::Result<Resolver> {
        let names = Arc::new(Mutex::new(due.keys().cloned().collect()));
        let stop = Arc::new(AtomicBool::new(false));
        let (wanted, stopped) = (Arc::clone(&names), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("wsplice-resolver".into())
            .spawn(move || run(&config, due, &wanted, &stopped, &answers))?;
        Ok(Resolver { names, stop })
    }

    /// The names to resolve from now on (a new one at once; one gone is forgotten).
    pub fn set_names(&self, names: Vec<String>) {
        *self.names.lock().unwrap_or_else(PoisonError::into_inner) = names;
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn run(
    config: &ResolverConfig,
    mut due: HashMap<String, Instant>,
    wanted: &Mutex<Vec<String>>,
    stop: &AtomicBool,
    answers: &Sender<Answer>,
) {
    while !stop.load(Ordering::Relaxed) {
        let names = wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        due.retain(|name, _| names.contains(name));
        let now = Instant::now();
        let ripe: Vec<String> = names
            .into_iter()
            .filter(|name| due.get(name).is_none_or(|&at| at <= now))
            .collect();
        for (name, result) in resolve_all(&ripe, config) {
            due.insert(name.clone(), next_due(&result));
            if answers.send((name, result)).is_err() {
                return; // the main thread is gone
            }
        }
        std::thread::sleep(ROUND);
    }
}

/// When a name is to be resolved again after `result`: on its TTL, or in [`RETRY`] after a
/// failure.
pub fn next_due(result: &Result<Resolved, DnsError>) -> Instant {
    Instant::now()
        + match result {
            Ok(resolved) => resolved.ttl,
            Err(_) => RETRY,
        }
}

/// Resolves `names` at once, a thread each (a name whose servers do not answer takes the
/// resolver's whole timeout; the others need not wait for it).
pub fn resolve_all(names: &[String], config: &ResolverConfig) -> Vec<Answer> {
    std::thread::scope(|scope| {
        let lookups: Vec<_> = names
            .iter()
            .map(|name| scope.spawn(move || (name.clone(), resolve(name, config))))
            .collect();
        lookups
            .into_iter()
            .filter_map(|lookup| lookup.join().ok())
            .collect()
    })
}

/// What an answer means for a name's addresses: the new ones (empty when the name is gone),
/// or `None` to keep the last ones (the resolution failed). Logged either way but the plain
/// success.
pub fn addresses(name: &str, result: Result<Resolved, DnsError>) -> Option<Vec<IpAddr>> {
    match result {
        Ok(resolved) => Some(resolved.addrs),
        Err(error @ (DnsError::NameError | DnsError::NoAddresses)) => {
            tracing::warn!(name, %error, "upstream name has no addresses: its servers leave their pools");
            Some(Vec::new())
        }
        Err(error) => {
            tracing::warn!(
                name,
                error = %crate::error_chain::describe(&error),
                "upstream name not resolved: its last addresses stay; tried again in 5 s"
            );
            None
        }
    }
}
