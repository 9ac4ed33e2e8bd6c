//! Configuration reload (`SIGHUP`): the config file is read and checked again, and the next
//! generation of the services is published for new connections; open connections keep the
//! generation they were accepted under.
//!
//! What a reload changes at once: routes, upstream pools, header rules, timeouts, request
//! limits, trusted proxies and the listeners' certificates and TLS settings. What sizes or binds
//! what is already running (listeners, workers, the admin listener, relay buffers, connection
//! limits, the kernel path's settings, the account) changes at the next restart: a reload that
//! changes them logs each one and applies the rest.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::{tls_configs, RuntimeError};
use crate::config::{Config, ConfigError, Splicing};
use crate::services::Services;
use crate::tls::ServerConfigs;

/// The services new connections get. A reload replaces them; each worker picks the new
/// generation up at its next loop turn (at most a tick later).
#[derive(Debug)]
pub struct Published {
    generation: AtomicU64,
    services: Mutex<Arc<Services>>,
}

impl Published {
    /// The first generation.
    pub fn new(services: Arc<Services>) -> Published {
        Published {
            generation: AtomicU64::new(0),
            services: Mutex::new(services),
        }
    }

    /// The generation published last (a cheap check for the workers' loop).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The services of the generation published last, and its number.
    pub fn current(&self) -> (u64, Arc<Services>) {
        // The lock is held for an `Arc` clone or swap only: a panic cannot leave it half done.
        let services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        (self.generation(), Arc::clone(&services))
    }

    /// Publishes the next generation; returns its number.
    fn publish(&self, next: Arc<Services>) -> u64 {
        let mut services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        *services = next;
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }
}

/// Where the config comes from, and what the command line overrides in it.
#[derive(Debug, Clone)]
pub struct ReloadSource {
    /// The config file `wsplice run` was started with.
    pub path: PathBuf,
    /// `--datapath kernel`: plain tunnels are spliced at once whatever `[kernel]` says.
    pub splice_at_once: bool,
}

/// Why a reload was refused (the running configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not load (syntax, values, references).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A certificate or key does not load.
    #[error(transparent)]
    Tls(#[from] RuntimeError),
}

/// Reloads on request: keeps the configuration the process started with, to tell what a new
/// file changes that only a restart applies.
#[derive(Debug)]
pub struct Reloader {
    source: ReloadSource,
    started: Config,
    published: Arc<Published>,
}

impl Reloader {
    /// A reloader for a process started with `started` (overrides applied).
    pub fn new(source: ReloadSource, started: Config, published: Arc<Published>) -> Reloader {
        Reloader {
            source,
            started,
            published,
        }
    }

    /// Reads the file again and publishes the next generation; returns its number. On error
    /// nothing changes.
    pub fn reload(&self) -> Result<u64, ReloadError> {
        let mut config = Config::load(&self.source.path)?;
        if self.source.splice_at_once {
            config.splicing = Splicing::AtOnce;
        }
        let tls = tls_configs(&config)?;
        for setting in restart_only_changes(&self.started, &config) {
            tracing::warn!(
                setting,
                "reload: this setting changed and takes effect at the next restart"
            );
        }
        let (_, current) = self.published.current();
        let listener_tls = tls_for_running_listeners(&self.started, &config, &tls, &current);
        let next = current.successor(&config, listener_tls);
        Ok(self.published.publish(Arc::new(next)))
    }
}

/// The TLS configuration of each running listener (those the process started with, in order)
/// from the new config: the new one where the listener is still there with the same scheme, the
/// running one where it was removed or changed scheme (that takes a restart).
fn tls_for_running_listeners(
    started: &Config,
    config: &Config,
    tls: &[Option<Arc<ServerConfigs>>],
    current: &Services,
) -> Vec<Option<Arc<ServerConfigs>>> {
    started
        .listeners
        .iter()
        .enumerate()
        .map(|(index, running)| {
            let running_tls = current.listener_tls.get(index).cloned().flatten();
            config
                .listeners
                .iter()
                .zip(tls)
                .find(|(listener, _)| listener.bind == running.bind)
                .filter(|(listener, _)| listener.tls.is_some() == running.tls.is_some())
                .map_or(running_tls, |(_, tls)| tls.clone())
        })
        .collect()
}

/// The settings `config` changes against `started` that a reload does not apply, by name.
pub fn restart_only_changes(started: &Config, config: &Config) -> Vec<&'static str> {
    let binds = |config: &Config| -> Vec<(std::net::SocketAddr, bool)> {
        config
            .listeners
            .iter()
            .map(|listener| (listener.bind, listener.tls.is_some()))
            .collect()
    };
    let (old, new) = (&started.limits, &config.limits);
    [
        (
            "listener (added, removed, or TLS on/off)",
            binds(started) != binds(config),
        ),
        ("admin", started.admin != config.admin),
        ("workers", started.workers != config.workers),
        ("pin_workers", started.pin_workers != config.pin_workers),
        ("user/group", started.run_as != config.run_as),
        (
            "kernel (promotion to the kernel path)",
            started.splicing != config.splicing,
        ),
        ("limits.relay_buffer", old.relay_buffer != new.relay_buffer),
        ("limits.max_tunnels", old.max_tunnels != new.max_tunnels),
        (
            "limits.max_connections",
            old.max_connections != new.max_connections,
        ),
        (
            "limits.max_connections_per_ip",
            old.max_connections_per_ip != new.max_connections_per_ip,
        ),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    const BASE: &str = "[[listener]]\nbind = \"127.0.0.1:8080\"\n\
        [[route]]\nupstream = \"app\"\n\
        [upstream.app]\nservers = [\"127.0.0.1:9000\"]\n";

    #[test]
    fn routes_pools_and_timeouts_reload_listeners_and_sizes_wait_for_a_restart() {
        let started = config(BASE);
        let reloadable = config(&format!(
            "{}[upstream.other]\nservers = [\"127.0.0.1:9001\"]\n\
             [timeouts]\nidle = \"10m\"\n",
            BASE.replace("upstream = \"app\"", "upstream = \"other\"")
        ));
        assert!(restart_only_changes(&started, &reloadable).is_empty());
        let restart = config(&format!(
            "{}[[listener]]\nbind = \"127.0.0.1:8081\"\n[limits]\nrelay_buffer = 16384\n",
            BASE
        ));
        assert_eq!(
            restart_only_changes(&started, &restart),
            [
                "listener (added, removed, or TLS on/off)",
                "limits.relay_buffer"
            ]
        );
    }
}
