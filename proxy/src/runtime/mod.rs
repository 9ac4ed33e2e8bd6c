//! The thread-per-core io_uring runtime (DESIGN.md §2): start one worker per core, each with its
//! own ring and `SO_REUSEPORT` listeners, and stop them all on SIGTERM/SIGINT after a drain.

mod token;
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
use worker::Worker;

/// Why the proxy could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
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
    splice: Option<SpliceProgram>,
) -> Result<(), RuntimeError> {
    let signals = SignalSet::termination()?;
    let services = Arc::new(Services::new(config, splice));
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
            splice_gauges(services.splice.clone()),
        )?;
    }

    let mut inboxes = pressure_watch(&services, workers, &shutdown)?;
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
                pin_to_cpu(index);
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

/// Thread per core: worker `index` runs on CPU `index` (modulo the CPUs this process may use),
/// so its ring, sockets and timers stay warm in one core's caches.
fn pin_to_cpu(index: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET/sched_*affinity work on this thread.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) != 0 {
            return;
        }
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &allowed))
            .collect();
        let Some(&cpu) = cpus.get(index % cpus.len().max(1)) else {
            return;
        };
        let mut only: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut only);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &only) != 0 {
            tracing::debug!(index, cpu, "could not pin the worker");
        }
    }
}

/// Kernel path: starts the thread that turns the program's pressure reports into checks by the
/// owning worker; returns each worker's inbox (none on the userspace path).
fn pressure_watch(
    services: &Services,
    workers: usize,
    shutdown: &Arc<AtomicBool>,
) -> Result<Vec<Option<Inbox>>, RuntimeError> {
    let Some(program) = services.splice.as_ref() else {
        return Ok((0..workers).map(|_| None).collect());
    };
    let ring = program
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take_pressure_ring();
    let Some(ring) = ring else {
        return Ok((0..workers).map(|_| None).collect());
    };
    let mut inboxes = Vec::with_capacity(workers);
    let mut mailboxes = Vec::with_capacity(workers);
    for _ in 0..workers {
        let wake = Arc::new(crate::splice::eventfd().map_err(RuntimeError::Spawn)?);
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

/// Gauges of the splice maps, read at scrape time (tests use them to prove cleanup).
fn splice_gauges(
    splice: Option<Arc<std::sync::Mutex<SpliceProgram>>>,
) -> crate::admin::ExtraGauges {
    Box::new(move || {
        let Some(program) = splice.as_ref() else {
            return Vec::new();
        };
        let program = program
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        vec![
            (
                "splice_peer_entries",
                "Sockets in the PEER sockhash.",
                program.peer_entries() as u64,
            ),
            (
                "splice_activity_entries",
                "Per-socket activity records.",
                program.tracked_entries() as u64,
            ),
        ]
    })
}

/// SIGTERM, SIGINT and SIGHUP, blocked in every thread and received synchronously here.
struct SignalSet {
    set: libc::sigset_t,
}

impl SignalSet {
    /// Blocks the signals in this thread (threads spawned later inherit the mask).
    fn termination() -> Result<SignalSet, RuntimeError> {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it; pthread_sigmask
        // only changes this thread's mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, signal);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(RuntimeError::Signals(std::io::Error::from_raw_os_error(rc)));
            }
            Ok(SignalSet { set })
        }
    }

    /// The next pending signal, waiting at most `timeout`.
    fn wait(&self, timeout: Duration) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `self.set` is an initialised signal set; a null siginfo pointer is allowed.
        let signal = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
        (signal > 0).then_some(signal)
    }
}
