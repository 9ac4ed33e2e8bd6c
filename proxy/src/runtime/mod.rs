//! The thread-per-core io_uring runtime: one worker per core, each with its own ring,
//! `SO_REUSEPORT` listeners, connections and timers, stopped on SIGTERM/SIGINT after a drain.
//! Everything here is I/O; what to do with a connection is decided by `connection`.

mod execute;
mod reads;
mod relay;
mod ring;
mod splice;
mod stream;
mod table;
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
use worker::Worker;

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
}

/// The rustls configuration of each listener (`None` for plain ones), in config order.
pub fn tls_configs(
    config: &Config,
) -> Result<Vec<Option<Arc<rustls::ServerConfig>>>, RuntimeError> {
    config
        .listeners
        .iter()
        .map(|listener| {
            listener
                .tls
                .as_ref()
                .map(crate::tls::server_config)
                .transpose()
                .map_err(|source| RuntimeError::Tls {
                    bind: listener.bind,
                    source,
                })
        })
        .collect()
}

/// Runs the proxy with `workers` threads until SIGTERM or SIGINT, then drains and returns.
/// With `splice`, plain tunnels are handed to the kernel program.
pub fn serve(
    config: &Config,
    workers: usize,
    mut splice: Option<SpliceProgram>,
) -> Result<(), RuntimeError> {
    if workers == 0 || workers > crate::tag::MAX_WORKERS {
        return Err(RuntimeError::TooManyWorkers(workers));
    }
    let signals = SignalSet::block_termination().map_err(RuntimeError::Signals)?;
    let ring = splice.as_mut().and_then(SpliceProgram::take_pressure_ring);
    let mut services = Services::new(config, splice.map(Arc::new));
    // Per-request access lines cost a record each: built only when they would be written.
    services.access_lines = tracing::enabled!(target: "wsplice::access", tracing::Level::INFO);
    let services = Arc::new(services);
    let shutdown = Arc::new(AtomicBool::new(false));
    let running = Arc::new(AtomicUsize::new(0));

    // Load certificates and bind everything before starting any worker, so a bad file or
    // address fails the start cleanly.
    let tls = tls_configs(config)?;
    let mut per_worker = Vec::with_capacity(workers);
    for _ in 0..workers {
        let listeners = config
            .listeners
            .iter()
            .zip(&tls)
            .map(|(l, tls)| Listener::bind(l.bind, tls.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        per_worker.push(listeners);
    }
    for listener in &config.listeners {
        let scheme = if listener.tls.is_some() { "wss" } else { "ws" };
        tracing::info!(bind = %listener.bind, workers, "listening ({scheme}://)");
    }
    if let Some(admin) = &config.admin {
        crate::admin::spawn(
            admin.bind,
            Arc::clone(&services.metrics),
            Arc::clone(&shutdown),
        )?;
    }

    let mut inboxes = pressure_watch(ring, workers, &shutdown)?;
    let mut handles = Vec::with_capacity(workers);
    for (index, listeners) in per_worker.into_iter().enumerate() {
        let inbox = inboxes.get_mut(index).and_then(Option::take);
        let worker = Worker::new(
            index,
            Arc::clone(&services),
            listeners,
            Arc::clone(&shutdown),
            inbox,
        )
        .map_err(|source| RuntimeError::Worker { index, source })?;
        let running = Arc::clone(&running);
        running.fetch_add(1, Ordering::SeqCst);
        let handle = thread::Builder::new()
            .name(format!("wsplice-w{index}"))
            .spawn(move || {
                sys::pin_to_cpu(index);
                let result = worker.run();
                running.fetch_sub(1, Ordering::SeqCst);
                result
            })
            .map_err(RuntimeError::Spawn)?;
        handles.push(handle);
    }

    // Wait for a termination signal, or for a worker to stop on its own (an error).
    while running.load(Ordering::SeqCst) == workers {
        match signals.wait(Duration::from_millis(200)) {
            Some(libc::SIGHUP) => {
                tracing::warn!("SIGHUP: configuration reload is not supported yet; ignoring");
            }
            Some(signal) => {
                tracing::info!(signal, "termination signal received");
                break;
            }
            None => {}
        }
    }
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
    match first_error {
        Some(error) => Err(error),
        None => {
            tracing::info!("all tunnels closed; exiting");
            Ok(())
        }
    }
}

/// Kernel path: starts the thread that turns the program's pressure reports into checks by the
/// owning worker; returns each worker's inbox (none on the userspace path).
fn pressure_watch(
    ring: Option<aya::maps::RingBuf<aya::maps::MapData>>,
    workers: usize,
    shutdown: &Arc<AtomicBool>,
) -> Result<Vec<Option<Inbox>>, RuntimeError> {
    let Some(ring) = ring else {
        return Ok((0..workers).map(|_| None).collect());
    };
    let mut inboxes = Vec::with_capacity(workers);
    let mut mailboxes = Vec::with_capacity(workers);
    for _ in 0..workers {
        let wake = Arc::new(sys::eventfd().map_err(RuntimeError::Spawn)?);
        let (sender, receiver) = std::sync::mpsc::channel();
        mailboxes.push(crate::splice::Mailbox {
            sender,
            wake: Arc::clone(&wake),
        });
        inboxes.push(Some(Inbox { receiver, wake }));
    }
    crate::splice::PressureWatcher::spawn(ring, mailboxes, Arc::clone(shutdown))
        .map_err(RuntimeError::Spawn)?;
    Ok(inboxes)
}
