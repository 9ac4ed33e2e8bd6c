//! Configuration reload (`SIGHUP`): the config file is read and checked again, and the next
//! generation of the services is published for new connections; open connections keep the
//! generation they were accepted under.
//!
//! What a reload changes at once: listeners (added ones are bound by the main thread, one socket
//! per worker, and handed to the workers; removed ones stop accepting and close, their accepted
//! connections going on), routes, upstream pools, header rules, timeouts, request limits,
//! trusted proxies and the listeners' certificates and TLS settings. What sizes what is already
//! running (workers, the admin listener, relay buffers, connection limits, the kernel path's
//! settings, the account, a listener switching between ws and wss) changes at the next restart:
//! a reload that changes them logs each one and applies the rest.
//!
//! A pool's servers also change without the file: set at run time through the admin endpoint
//! (`PUT /upstreams/NAME`), or as their DNS names resolve anew (`upstream::membership` keeps
//! both; the resolver thread is `runtime/resolver.rs`). Each change publishes a generation as
//! a reload does.
//!
//! Certificates are also watched: when a certificate or key file of the running configuration
//! changes (an ACME renewal), the listeners' TLS configurations are built again from it, the
//! rest untouched. Either way the ticket keys and session cache carry over, so clients resume
//! across a reload.

use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::RuntimeError;
use crate::config::{Config, ConfigError, ListenerConfig, NamedServer, ServerConfig, Splicing};
use crate::listener::{BindError, Listener};
use crate::services::{ServedListener, Services};
use crate::upstream::membership::{Membership, MembershipError};

/// How often the certificate and key files are looked at (a `stat` each).
const CERTIFICATE_CHECK: Duration = Duration::from_secs(2);

/// The services new connections get. A reload replaces them; each worker picks the new
/// generation up at its next wake-up (a tick at the latest), with the sockets of the listeners
/// it added.
#[derive(Debug)]
pub struct Published {
    generation: AtomicU64,
    services: Mutex<Arc<Services>>,
    /// Per worker: sockets of listeners added by reloads, not yet taken by the worker.
    new_listeners: Vec<Mutex<Vec<Listener>>>,
    /// Binary upgrade: what the main thread and the workers exchange.
    pub handoff: super::handover::Handoff,
}

impl Published {
    /// The first generation, for `workers` workers.
    pub fn new(services: Arc<Services>, workers: usize) -> Published {
        Published {
            generation: AtomicU64::new(0),
            services: Mutex::new(services),
            new_listeners: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
            handoff: super::handover::Handoff::default(),
        }
    }

    /// Worker `worker`'s sockets of the listeners added since it last asked.
    pub fn take_new_listeners(&self, worker: usize) -> Vec<Listener> {
        self.new_listeners
            .get(worker)
            .map_or_else(Vec::new, |sockets| {
                std::mem::take(&mut *sockets.lock().unwrap_or_else(PoisonError::into_inner))
            })
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
    /// An added listener cannot be bound (a port below 1024 once privileges are dropped, an
    /// address in use).
    #[error(transparent)]
    Bind(#[from] BindError),
    /// A run-time change names no pool of the configuration.
    #[error(transparent)]
    Membership(#[from] MembershipError),
}

/// Reloads on request: keeps the configuration the process started with, to tell what a new
/// file changes that only a restart applies, and the one applied last, whose certificate files
/// it watches.
#[derive(Debug)]
pub struct Reloader {
    source: ReloadSource,
    started: Config,
    /// The file as read last (what `membership` changes at run time applies to).
    applied: Config,
    /// The pools' servers set at run time and the names' resolved addresses.
    membership: Membership,
    published: Arc<Published>,
    /// The certificate and key files of `applied`, and what they were when last looked at.
    watched: Vec<(PathBuf, Option<FileStamp>)>,
    last_check: Instant,
}

/// What tells a file changed: its time, size and inode (a renewal that swaps a symlink or
/// renames a new file over the old one changes the inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    fn of(path: &std::path::Path) -> Option<FileStamp> {
        let metadata = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            modified: metadata.modified().ok(),
            len: metadata.len(),
            inode: metadata.ino(),
        })
    }
}

impl Reloader {
    /// A reloader for a process started with `started` (overrides applied), whose pools run
    /// with `membership` (the names resolved at start).
    pub fn new(
        source: ReloadSource,
        started: Config,
        membership: Membership,
        published: Arc<Published>,
    ) -> Reloader {
        let watched = watch_list(&started);
        Reloader {
            source,
            applied: started.clone(),
            membership,
            started,
            published,
            watched,
            last_check: Instant::now(),
        }
    }

    /// Reads the file again and publishes the next generation; returns its number. On error
    /// nothing changes.
    pub fn reload(&mut self) -> Result<u64, ReloadError> {
        let mut config = Config::load(&self.source.path)?;
        if self.source.splice_at_once {
            config.splicing = Splicing::AtOnce;
        }
        for setting in restart_only_changes(&self.started, &config) {
            tracing::warn!(
                setting,
                "reload: this setting changed and takes effect at the next restart"
            );
        }
        let dropped = self.membership.reloaded(&config);
        let generation = self.publish(&self.membership.effective(&config))?;
        for pool in dropped {
            tracing::info!(
                pool,
                "reload: the file's servers of this pool changed: they replace those set at run time"
            );
        }
        self.watched = watch_list(&config);
        self.applied = config;
        Ok(generation)
    }

    /// `PUT /upstreams/NAME`: serves `pool` with `servers` from now on; returns the
    /// generation that does (the current one when nothing changes).
    pub fn set_servers(
        &mut self,
        pool: &str,
        servers: (Vec<ServerConfig>, Vec<NamedServer>),
    ) -> Result<u64, ReloadError> {
        if !self.membership.set_servers(&self.applied, pool, servers)? {
            return Ok(self.published.generation());
        }
        self.publish(&self.membership.effective(&self.applied))
    }

    /// `host` resolved to `addrs`: publishes the pools that list it with its new addresses
    /// (`None`: no news).
    pub fn resolved(
        &mut self,
        host: &str,
        addrs: Vec<std::net::IpAddr>,
    ) -> Option<Result<u64, ReloadError>> {
        if !self.membership.resolved(host, addrs) {
            return None;
        }
        Some(self.publish(&self.membership.effective(&self.applied)))
    }

    /// The servers set at run time (what a successor takes over).
    pub fn run_time_servers(&self) -> crate::upstream::membership::RunTimeServers {
        self.membership.run_time_servers()
    }

    /// Every name the running pools list (what the resolver thread resolves).
    pub fn names(&self) -> Vec<String> {
        self.membership.names(&self.applied)
    }

    /// Whether a certificate or key file of the running configuration changed since it was
    /// last looked at (looked at every 2 s at most; cheaper than that to call).
    pub fn certificates_changed(&mut self) -> bool {
        if self.last_check.elapsed() < CERTIFICATE_CHECK {
            return false;
        }
        self.last_check = Instant::now();
        let mut changed = false;
        for (path, stamp) in &mut self.watched {
            let now = FileStamp::of(path);
            if now != *stamp {
                *stamp = now;
                changed = true;
            }
        }
        changed
    }

    /// Builds the listeners' TLS configurations again from the running configuration (its
    /// files read again) and publishes them with everything else unchanged.
    pub fn reload_certificates(&mut self) -> Result<u64, ReloadError> {
        self.publish(&self.membership.effective(&self.applied))
    }

    /// Publishes the generation of `config` after the current one, with the sockets of the
    /// listeners it adds.
    fn publish(&self, config: &Config) -> Result<u64, ReloadError> {
        let (_, current) = self.published.current();
        let listeners = served_listeners(config, &current)?;
        let added: Vec<&ServedListener> = listeners
            .iter()
            .filter(|listener| !current.listeners.iter().any(|l| l.bind == listener.bind))
            .collect();
        // Every socket is bound before any is handed over: a reload that cannot bind one
        // changes nothing.
        let mut sockets = Vec::with_capacity(self.published.new_listeners.len());
        for _ in &self.published.new_listeners {
            let bound = added
                .iter()
                .map(|listener| Listener::bind(listener.bind, listener.tls.is_some()))
                .collect::<Result<Vec<_>, _>>()?;
            sockets.push(bound);
        }
        for listener in &added {
            let scheme = if listener.tls.is_some() { "wss" } else { "ws" };
            tracing::info!(bind = %listener.bind, "reload: listening ({scheme}://)");
        }
        for listener in &current.listeners {
            if !listeners.iter().any(|l| l.bind == listener.bind) {
                tracing::info!(
                    bind = %listener.bind,
                    "reload: listener removed; its open connections go on"
                );
            }
        }
        for (mailbox, bound) in self.published.new_listeners.iter().zip(sockets) {
            mailbox
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(bound);
        }
        let next = current.successor(config, listeners);
        Ok(self.published.publish(Arc::new(next)))
    }
}

/// The certificate and key files of `config`, as they are now.
fn watch_list(config: &Config) -> Vec<(PathBuf, Option<FileStamp>)> {
    config
        .listeners
        .iter()
        .filter_map(|listener| listener.tls.as_ref())
        .flat_map(|tls| std::iter::once(&tls.default).chain(tls.sni.iter().map(|sni| &sni.files)))
        .flat_map(|files| [files.cert.clone(), files.key.clone()])
        .map(|path| {
            let stamp = FileStamp::of(&path);
            (path, stamp)
        })
        .collect()
}

/// The listeners `config` asks for, with their TLS configurations built again (a listener
/// already served keeps its ticket keys and session cache): every certificate of the file is
/// loaded once, here. A served listener whose scheme the new config switches (ws and wss) stays
/// as it is: that takes a restart.
fn served_listeners(
    config: &Config,
    current: &Services,
) -> Result<Vec<ServedListener>, ReloadError> {
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for wanted in &config.listeners {
        let served = current.listeners.iter().find(|l| l.bind == wanted.bind);
        let listener = match (served, &wanted.tls) {
            (Some(served), tls) if served.tls.is_some() != tls.is_some() => {
                // Kept as it runs, but the file's certificates must still load, as `wsplice
                // check` asks of every listener.
                if let Some(tls) = tls {
                    crate::tls::server_configs(tls).map_err(|source| tls_error(wanted, source))?;
                }
                ServedListener {
                    proxy_protocol: wanted.proxy_protocol,
                    ..served.clone()
                }
            }
            (Some(ServedListener { tls: Some(old), .. }), Some(tls)) => ServedListener {
                bind: wanted.bind,
                proxy_protocol: wanted.proxy_protocol,
                tls: Some(
                    old.reloaded(tls)
                        .map_err(|source| tls_error(wanted, source))?,
                ),
            },
            (_, tls) => ServedListener {
                bind: wanted.bind,
                proxy_protocol: wanted.proxy_protocol,
                tls: tls
                    .as_ref()
                    .map(crate::tls::server_configs)
                    .transpose()
                    .map_err(|source| tls_error(wanted, source))?,
            },
        };
        listeners.push(listener);
    }
    Ok(listeners)
}

/// A listener's TLS configuration does not load.
fn tls_error(listener: &ListenerConfig, source: crate::tls::TlsSetupError) -> ReloadError {
    ReloadError::Tls(RuntimeError::Tls {
        bind: listener.bind,
        source,
    })
}

/// The settings `config` changes against `started` that a reload does not apply, by name.
pub fn restart_only_changes(started: &Config, config: &Config) -> Vec<&'static str> {
    let switched = config.listeners.iter().any(|listener| {
        started
            .listeners
            .iter()
            .any(|old| old.bind == listener.bind && old.tls.is_some() != listener.tls.is_some())
    });
    let (old, new) = (&started.limits, &config.limits);
    [
        ("listener switched between ws and wss", switched),
        ("admin", started.admin != config.admin),
        ("workers", started.workers != config.workers),
        ("pin_workers", started.pin_workers != config.pin_workers),
        ("user/group", started.run_as != config.run_as),
        ("resolvers", started.resolvers != config.resolvers),
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
        let added = config(&format!("{BASE}[[listener]]\nbind = \"127.0.0.1:8081\"\n"));
        assert!(restart_only_changes(&started, &added).is_empty());
        let restart = config(&format!(
            "{}[limits]\nrelay_buffer = 16384\n",
            BASE.replace(
                "8080\"",
                "8080\"\ntls = { cert = \"c.pem\", key = \"k.pem\" }"
            )
        ));
        assert_eq!(
            restart_only_changes(&started, &restart),
            [
                "listener switched between ws and wss",
                "limits.relay_buffer"
            ]
        );
    }
}
