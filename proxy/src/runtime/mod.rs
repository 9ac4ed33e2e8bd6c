//! The thread-per-core io_uring runtime: one worker per core, each with its own ring,
//! `SO_REUSEPORT` listeners, connections and timers, stopped on SIGTERM/SIGINT after a drain.
//! Everything here is I/O; what to do with a connection is decided by `connection`.

mod execute;
mod handover;
mod packet;
mod reads;
mod rebalance;
mod relay;
mod reload;
mod resolver;
mod ring;
mod splice;
mod stream;
mod support;
mod table;
mod upgrade;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

pub use worker::{Inbox, WorkerError};

use crate::config::Config;
use crate::listener::{BindError, Listener};
use crate::services::Services;
use crate::splice::SpliceProgram;
use crate::sys::{self, SignalSet};
use crate::tls::ServerConfigs;
use worker::Worker;

pub use reload::{restart_only_changes, Published, ReloadSource, Reloader};

/// Why the proxy could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// More workers than a tag can name.
    #[error("{0} workers asked for; at most {max}", max = crate::tag::MAX_WORKERS)]
    TooManyWorkers(usize),
    /// A listener address could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// A worker could not start or failed.
    #[error("worker {index}: {source}")]
    Worker {
        /// Which worker.
        index: usize,
        /// What failed.
        #[source]
        source: WorkerError,
    },
    /// The kernel cannot run the workers (too old, io_uring missing or disabled).
    #[error(transparent)]
    Kernel(#[from] support::SupportError),
    /// Spawning a worker thread failed.
    #[error("cannot spawn worker thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// A worker thread panicked (a bug).
    #[error("worker {0} panicked")]
    Panicked(usize),
    /// The admin listener could not start.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// A TLS listener's certificates or settings are unusable.
    #[error("listener {bind}")]
    Tls {
        /// The listener.
        bind: std::net::SocketAddr,
        /// What is wrong.
        #[source]
        source: crate::tls::TlsSetupError,
    },
    /// Signal handling could not be set up.
    #[error("signal set-up failed: {0}")]
    Signals(#[source] std::io::Error),
    /// A handle on the splice maps could not be opened.
    #[error("cannot open the splice maps: {0}")]
    Splice(#[source] crate::splice::SpliceError),
    /// Privileges could not be dropped as the config asks.
    #[error(transparent)]
    Privileges(#[from] crate::privileges::PrivilegeError),
}

/// What `wsplice run` adds to the config.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// The account to switch to once everything is bound (`user`/`group`, resolved by
    /// [`crate::privileges::resolve`]); `None`: stay as started.
    pub identity: Option<crate::privileges::Identity>,
    /// Fault injection for tests only (`wsplice run --test-panic-after-accepts N`, hidden):
    /// each worker panics when it accepts its N-th connection.
    pub panic_after_accepts: Option<std::num::NonZeroU64>,
    /// Where `SIGHUP` reads the config again (`None`: reload is refused).
    pub reload: Option<ReloadSource>,
    /// How this process was started: `SIGUSR2` starts a successor the same way (`None`:
    /// upgrades are refused).
    pub launch: Option<crate::upgrade::Launch>,
    /// The packet splice, loaded and attached (`--datapath packet`).
    pub packet: Option<crate::splice::packet::SharedPacketPath>,
}

/// Counts a worker as running until its thread ends, however it ends: dropped on return and
/// while unwinding from a panic alike, so the main loop sees a worker that died (with
/// `panic = "abort"` and the binary's panic hook a panic ends the process first; this is for
/// builds that unwind).
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The rustls configuration of each listener (`None` for plain ones), in config order.
pub fn tls_configs(config: &Config) -> Result<Vec<Option<Arc<ServerConfigs>>>, RuntimeError> {
    config
        .listeners
        .iter()
        .map(|listener| {
            listener
                .tls
                .as_ref()
                .map(crate::tls::server_configs)
                .transpose()
                .map_err(|source| RuntimeError::Tls {
                    bind: listener.bind,
                    source,
                })
        })
        .collect()
}

/// Runs the proxy with `workers` threads until SIGTERM or SIGINT, then drains and returns.
/// With `splice`, plain tunnels are handed to the kernel program. Everything privileged
/// (binding, opening the maps) is done before privileges are dropped and any thread starts.
pub fn serve(
    config: &Config,
    workers: usize,
    mut splice: Option<SpliceProgram>,
    options: &ServeOptions,
    mut inherited: Option<crate::upgrade::Inherited>,
) -> Result<(), RuntimeError> {
    if workers == 0 || workers > crate::tag::MAX_WORKERS {
        return Err(RuntimeError::TooManyWorkers(workers));
    }
    let support = support::check()?;
    let signals = SignalSet::block_termination().map_err(RuntimeError::Signals)?;
    let ring = splice.as_mut().and_then(SpliceProgram::take_pressure_ring);
    // Load certificates and bind everything before starting any worker, so a bad file or
    // address fails the start cleanly.
    let tls = tls_configs(config)?;
    // Servers given by name are resolved once before the first generation (a name that does
    // not resolve leaves its pool without those servers until it does).
    let resolver_config = match config.resolvers.as_slice() {
        [] => crate::upstream::dns::ResolverConfig::system(),
        servers => crate::upstream::dns::ResolverConfig {
            nameservers: servers.to_vec(),
            ..crate::upstream::dns::ResolverConfig::default()
        },
    };
    let mut membership = crate::upstream::membership::Membership::default();
    if let Some(inherited) = inherited.as_mut() {
        membership.adopt(config, std::mem::take(&mut inherited.pools));
    }
    // When each name is due again: the resolver thread takes over from these answers.
    let mut names_due = std::collections::HashMap::new();
    for (name, result) in resolver::resolve_all(&membership.names(config), &resolver_config) {
        names_due.insert(name.clone(), resolver::next_due(&result));
        if let Some(addrs) = resolver::addresses(&name, result) {
            tracing::info!(name, addresses = ?addrs, "upstream name resolved");
            membership.resolved(&name, addrs);
        }
    }
    let mut services = Services::new(&membership.effective(config), splice.map(Arc::new));
    // Per-request access lines cost a record each: built only when they would be written.
    services.access_lines = tracing::enabled!(target: "wsplice::access", tracing::Level::INFO);
    services.packet = options.packet.clone();
    services.listeners = config
        .listeners
        .iter()
        .zip(&tls)
        .map(|(listener, tls)| crate::services::ServedListener {
            bind: listener.bind,
            tls: tls.clone(),
            proxy_protocol: listener.proxy_protocol,
        })
        .collect();
    let services = Arc::new(services);
    let published = Arc::new(Published::new(Arc::clone(&services), workers));
    let mut reloader = options
        .reload
        .clone()
        .map(|source| Reloader::new(source, config.clone(), membership, Arc::clone(&published)));
    let shutdown = Arc::new(AtomicBool::new(false));
    // `/readyz` answers 503 from the termination signal on; the workers stop accepting after
    // `timeouts.grace`.
    let unready = Arc::new(AtomicBool::new(false));
    let running = Arc::new(AtomicUsize::new(0));

    let per_worker = listeners_per_worker(config, &tls, workers, inherited.as_mut())?;
    let admin = match (
        &config.admin,
        inherited.as_mut().and_then(|i| i.admin.take()),
    ) {
        (Some(admin), Some((addr, socket))) if addr == admin.bind => {
            Some(crate::admin::AdminListener::adopt(addr, socket))
        }
        (Some(admin), _) => Some(crate::admin::bind(admin.bind)?),
        (None, _) => None,
    };
    let admin_copy = admin
        .as_ref()
        .map(crate::admin::AdminListener::socket_copy)
        .transpose()
        .map_err(RuntimeError::Spawn)?;
    let (mut inboxes, mailboxes, deliveries) = worker_inboxes(workers)?;
    let mut ready = Vec::with_capacity(workers);
    for (index, listeners) in per_worker.into_iter().enumerate() {
        let inbox = inboxes.get_mut(index).and_then(Option::take);
        let mut worker = Worker::new(
            index,
            Arc::clone(&published),
            listeners,
            Arc::clone(&shutdown),
            inbox,
            support,
        )
        .map_err(|source| RuntimeError::Worker { index, source })?;
        worker.panic_after_accepts = options.panic_after_accepts;
        ready.push(worker);
    }

    // Everything that needed privileges is done: drop them while this is the only thread.
    drop_privileges(options, services.splice.as_deref())?;

    // `POST /reload` and `POST /upgrade` on the admin listener ask the main thread, as
    // SIGHUP and SIGUSR2 do.
    let (reload_requests, reload_inbox) = std::sync::mpsc::channel::<crate::admin::ReloadRequest>();
    let (upgrade_requests, upgrade_inbox) =
        std::sync::mpsc::channel::<crate::admin::UpgradeRequest>();
    let (servers_requests, servers_inbox) =
        std::sync::mpsc::channel::<crate::admin::ServersRequest>();
    // Names are resolved again on their TTLs (a process without a config file to reload has
    // none to resolve: its pools cannot change).
    let (answers, resolutions) = std::sync::mpsc::channel::<resolver::Answer>();
    let resolver = match &reloader {
        Some(_) => Some(
            resolver::Resolver::spawn(resolver_config, names_due, answers)
                .map_err(RuntimeError::Spawn)?,
        ),
        None => None,
    };
    let mut upgrader = options.launch.clone().map(|launch| {
        upgrade::Upgrader::new(
            launch,
            Arc::clone(&published),
            workers,
            admin_copy,
            services.splice.clone(),
        )
    });
    let admin_retired = Arc::new(AtomicBool::new(false));
    if let Some(admin) = admin {
        let controls = crate::admin::Controls {
            reload: reloader.is_some().then_some(reload_requests),
            servers: reloader.is_some().then_some(servers_requests),
            upgrade: upgrader.is_some().then_some(upgrade_requests),
            retired: Arc::clone(&admin_retired),
        };
        admin.serve(
            Arc::clone(&services.metrics),
            Arc::clone(&unready),
            controls,
        )?;
    }
    if let Some(ring) = ring {
        let adopted = services
            .splice
            .as_ref()
            .map(|program| Arc::clone(&program.adopted_owners))
            .unwrap_or_default();
        crate::splice::PressureWatcher::spawn(ring, mailboxes, adopted, Arc::clone(&shutdown))
            .map_err(RuntimeError::Spawn)?;
    }
    // Active health checks of the current generation's pools (a reload's pools take over at
    // the checker's next round); stopped when this function returns.
    let upstreams = Arc::clone(&services.metrics);
    let _checker =
        crate::upstream::health::spawn_checker(move || upstreams.upstreams.targets(), |_, _| {})
            .map_err(RuntimeError::Spawn)?;
    let mut handles = Vec::with_capacity(workers);
    let pin_workers = config.pin_workers;
    for (index, worker) in ready.into_iter().enumerate() {
        running.fetch_add(1, Ordering::SeqCst);
        let running = Running(Arc::clone(&running));
        let handle = thread::Builder::new()
            .name(format!("wsplice-w{index}"))
            .spawn(move || {
                let _running = running;
                if pin_workers {
                    sys::pin_to_cpu(index);
                }
                worker.run()
            })
            .map_err(RuntimeError::Spawn)?;
        handles.push(handle);
    }

    match inherited.take() {
        Some(inherited) => {
            let kernel = inherited.kernel_adopted;
            upgrade::adopt_tunnels(
                inherited.channel,
                inherited.predecessor,
                kernel,
                deliveries,
                Arc::clone(&published),
            )
            .map_err(RuntimeError::Spawn)?;
        }
        None => crate::upgrade::notify::notify("READY=1"),
    }

    // Wait for a termination signal, for a successor to take over, or for a worker to stop on
    // its own (an error).
    let mut successor = None;
    let mut grace_ends: Option<std::time::Instant> = None;
    let mut names_generation = published.generation();
    while running.load(Ordering::SeqCst) == workers {
        let mut upgrade_asked = Vec::new();
        match signals.wait(Duration::from_millis(200)) {
            Some(libc::SIGHUP) => {
                let _ = reload(reloader.as_mut(), &services.metrics);
            }
            Some(libc::SIGUSR2) => upgrade_asked.push(None),
            Some(signal) => {
                let grace = published.current().1.grace;
                if grace.is_zero() || grace_ends.is_some() {
                    tracing::info!(signal, "termination signal received");
                    break;
                }
                // Not ready any more, still accepting: the balancers' next check takes this
                // host out before its listeners close. A second signal cuts it short.
                unready.store(true, Ordering::SeqCst);
                grace_ends = Some(std::time::Instant::now() + grace);
                tracing::info!(
                    signal,
                    grace_ms = grace.as_millis() as u64,
                    "termination signal received: /readyz answers 503; accepting for the grace \
                     period, then draining"
                );
            }
            None => {}
        }
        if grace_ends.is_some_and(|ends| std::time::Instant::now() >= ends) {
            tracing::info!("grace period over: draining");
            break;
        }
        while let Ok(reply) = reload_inbox.try_recv() {
            // The admin thread may have given up waiting: nobody to tell then.
            let _ = reply.send(reload(reloader.as_mut(), &services.metrics));
        }
        if let (Some(reloader), Some(resolver)) = (reloader.as_mut(), resolver.as_ref()) {
            change_members(reloader, &servers_inbox, &resolutions);
            // What the resolver looks up changes only with a new generation (a reload, a
            // run-time change).
            let generation = published.generation();
            if generation != names_generation {
                names_generation = generation;
                resolver.set_names(reloader.names());
            }
        }
        upgrade_asked.extend(upgrade_inbox.try_iter().map(Some));
        if !upgrade_asked.is_empty() {
            let outcome = if published.handoff.is_adopting() {
                let why =
                    "the predecessor is still handing its tunnels over: upgrade once it is done";
                tracing::warn!("upgrade refused: {why}");
                Err(why.to_owned())
            } else {
                start_successor(upgrader.as_mut(), reloader.as_ref(), &services.metrics)
            };
            let answer = outcome
                .as_ref()
                .map(|started| started.pid)
                .map_err(Clone::clone);
            for reply in upgrade_asked.into_iter().flatten() {
                let _ = reply.send(answer.clone());
            }
            if let Ok(started) = outcome {
                successor = Some(started);
                break;
            }
        }
        if let Some(reloader) = reloader.as_mut() {
            if reloader.certificates_changed() {
                reload_certificates(reloader, &services.metrics);
            }
        }
    }
    if successor.is_some() {
        // The successor accepts on the admin socket from now on.
        admin_retired.store(true, Ordering::SeqCst);
    }
    // A request the admin thread still takes is told at once that this process is stopping.
    drop((reload_inbox, upgrade_inbox, servers_inbox));
    unready.store(true, Ordering::SeqCst);
    shutdown.store(true, Ordering::SeqCst);

    let mut first_error = None;
    for (index, handle) in handles.into_iter().enumerate() {
        let outcome = match handle.join() {
            Ok(Ok(())) => continue,
            Ok(Err(source)) => RuntimeError::Worker { index, source },
            Err(_) => RuntimeError::Panicked(index),
        };
        tracing::error!(error = %outcome, "worker failed");
        first_error.get_or_insert(outcome);
    }
    if let Some(successor) = successor {
        published.handoff.close();
        successor.finish();
    }
    match first_error {
        Some(error) => Err(error),
        None => {
            tracing::info!("all tunnels closed; exiting");
            Ok(())
        }
    }
}

/// `SIGUSR2` or `POST /upgrade`: starts a successor; the outcome for `wsplice upgrade`.
fn start_successor(
    upgrader: Option<&mut upgrade::Upgrader>,
    reloader: Option<&Reloader>,
    metrics: &crate::metrics::Metrics,
) -> Result<upgrade::Started, String> {
    let Some(upgrader) = upgrader else {
        let why = "this process was started without its command line to start again";
        tracing::warn!("upgrade: {why}");
        metrics.upgrade_failures.inc();
        return Err(why.into());
    };
    tracing::info!("upgrade: starting the successor");
    let pools = reloader.map(Reloader::run_time_servers).unwrap_or_default();
    upgrader.start(pools).map_err(|error| {
        let error = crate::error_chain::describe(&error);
        tracing::error!(%error, "upgrade failed; this process keeps serving");
        metrics.upgrade_failures.inc();
        error
    })
}

/// Each worker's listening sockets: one per listener (a predecessor's sockets first, spread
/// over the workers; bound here for the rest).
fn listeners_per_worker(
    config: &Config,
    tls: &[Option<Arc<ServerConfigs>>],
    workers: usize,
    mut inherited: Option<&mut crate::upgrade::Inherited>,
) -> Result<Vec<Vec<Listener>>, RuntimeError> {
    let mut per_worker: Vec<Vec<Listener>> = (0..workers).map(|_| Vec::new()).collect();
    for (listener, tls) in config.listeners.iter().zip(tls) {
        let (bind, is_tls) = (listener.bind, tls.is_some());
        let adopted = inherited
            .as_deref_mut()
            .map(|inherited| inherited.take_listeners(bind))
            .unwrap_or_default();
        let from_predecessor = adopted.len();
        for (index, socket) in adopted.into_iter().enumerate() {
            per_worker[index % workers].push(Listener::adopt(socket, bind, is_tls));
        }
        for sockets in &mut per_worker {
            if !sockets.iter().any(|socket| socket.addr == bind) {
                sockets.push(Listener::bind(bind, is_tls)?);
            }
        }
        let scheme = if is_tls { "wss" } else { "ws" };
        tracing::info!(%bind, workers, from_predecessor, "listening ({scheme}://)");
    }
    Ok(per_worker)
}

/// `SIGHUP` or `POST /reload`: publishes the config file's next generation, or logs why it
/// was refused (the running one stays). The outcome, for `wsplice reload`.
fn reload(
    reloader: Option<&mut Reloader>,
    metrics: &crate::metrics::Metrics,
) -> Result<u64, String> {
    let Some(reloader) = reloader else {
        let why = "this process was started without a config file to read again";
        tracing::warn!("reload: {why}");
        return Err(why.into());
    };
    match reloader.reload() {
        Ok(generation) => {
            metrics.config_reloads.inc();
            tracing::info!(
                generation,
                "configuration reloaded: new connections use it, open ones keep theirs"
            );
            Ok(generation)
        }
        Err(error) => {
            metrics.config_reload_failures.inc();
            let error = crate::error_chain::describe(&error);
            tracing::error!(
                %error,
                "configuration reload refused; the running configuration stays"
            );
            Err(error)
        }
    }
}

/// Run-time changes of the pools' servers: those `PUT /upstreams/NAME` asked for, and the
/// names the resolver thread resolved anew; each change publishes a generation.
fn change_members(
    reloader: &mut Reloader,
    requests: &std::sync::mpsc::Receiver<crate::admin::ServersRequest>,
    resolutions: &std::sync::mpsc::Receiver<resolver::Answer>,
) {
    for (change, reply) in requests.try_iter() {
        let outcome = reloader.set_servers(&change.pool, change.servers);
        match &outcome {
            Ok(generation) => tracing::info!(
                pool = change.pool,
                generation,
                "servers set at run time: new connections use them"
            ),
            Err(error) => tracing::warn!(pool = change.pool, %error, "servers not set"),
        }
        let _ = reply.send(outcome.map_err(|error| error.to_string()));
    }
    for (name, result) in resolutions.try_iter() {
        let Some(addrs) = resolver::addresses(&name, result) else {
            continue;
        };
        match reloader.resolved(&name, addrs.clone()) {
            None => {}
            Some(Ok(generation)) => {
                tracing::info!(name, addresses = ?addrs, generation, "upstream name resolved anew: its pools use the new addresses");
            }
            Some(Err(error)) => {
                tracing::warn!(name, %error, "upstream name resolved anew but not applied")
            }
        }
    }
}

/// A certificate or key file changed (a renewal): the listeners' TLS configurations are built
/// again from the running configuration.
fn reload_certificates(reloader: &mut Reloader, metrics: &crate::metrics::Metrics) {
    match reloader.reload_certificates() {
        Ok(generation) => {
            metrics.certificate_reloads.inc();
            tracing::info!(
                generation,
                "certificate files changed: new connections get the new certificates"
            );
        }
        Err(error) => {
            metrics.config_reload_failures.inc();
            tracing::error!(
                error = %crate::error_chain::describe(&error),
                "certificate files changed but do not load; the running certificates stay"
            );
        }
    }
}

/// Each worker's inbox (pressure reports, tunnels from a predecessor), the pressure
/// watcher's side of them, and the adoption thread's. The threads start later, after the
/// privileges are dropped.
#[allow(clippy::type_complexity)]
fn worker_inboxes(
    workers: usize,
) -> Result<
    (
        Vec<Option<Inbox>>,
        Vec<crate::splice::Mailbox>,
        Vec<handover::Deliveries>,
    ),
    RuntimeError,
> {
    let mut inboxes = Vec::with_capacity(workers);
    let mut mailboxes = Vec::with_capacity(workers);
    let mut deliveries = Vec::with_capacity(workers);
    for _ in 0..workers {
        let wake = Arc::new(sys::eventfd().map_err(RuntimeError::Spawn)?);
        let (sender, receiver) = std::sync::mpsc::channel();
        let (adopt, adoptions) = std::sync::mpsc::channel();
        mailboxes.push(crate::splice::Mailbox {
            sender,
            wake: Arc::clone(&wake),
        });
        deliveries.push(handover::Deliveries {
            sender: adopt,
            wake: Arc::clone(&wake),
        });
        inboxes.push(Some(Inbox {
            receiver,
            adoptions,
            wake,
        }));
    }
    Ok((inboxes, mailboxes, deliveries))
}

/// Drops privileges as configured and says what is left. On the kernel path the probe is one
/// lookup in the program's `ACTIVITY` map through a fresh handle, as the workers will do.
fn drop_privileges(
    options: &ServeOptions,
    splice: Option<&SpliceProgram>,
) -> Result<(), RuntimeError> {
    let probe = |program: &SpliceProgram| -> Result<(), (bool, String)> {
        let refused = |error: crate::splice::SpliceError| {
            let denied = matches!(error, crate::splice::SpliceError::PermissionDenied(_));
            (denied, error.to_string())
        };
        let maps = program.maps().map_err(refused)?;
        maps.activity(0).map(|_| ()).map_err(refused)
    };
    let probe = splice.map(|program| move || probe(program));
    let probe = probe
        .as_ref()
        .map(|probe| probe as crate::privileges::KernelProbe<'_>);
    match crate::privileges::drop_privileges(options.identity.as_ref(), probe)? {
        crate::privileges::Outcome::StillRoot => {}
        crate::privileges::Outcome::Dropped { uid, gid, kept } => tracing::info!(
            uid,
            gid,
            capabilities = %crate::privileges::capability_names(kept),
            no_new_privs = true,
            "privileges dropped"
        ),
    }
    Ok(())
}
