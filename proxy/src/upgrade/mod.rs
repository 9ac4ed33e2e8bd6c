//! Binary upgrade: a running process starts its successor (the binary now at the path it was
//! started from, with the same command line) and hands it, over a Unix socket, its listening
//! sockets, its admin socket, the kernel program's maps and every tunnel that can move
//! (`connection::handover` says which). Nothing is closed or re-bound, so no connection is
//! refused and no tunnel notices.
//!
//! The old process keeps serving until the successor says it is ready; a successor that fails
//! to start (it exits, or says nothing within [`READY_WAIT`]) is stopped and the old process
//! goes on as if nothing happened. Once ready, the old process stops accepting and drains:
//! its tunnels leave one by one for the successor as they can, what cannot move (TLS
//! tunnels, requests in progress) ends in the old process under `timeouts.drain`, and the old
//! process exits when it holds nothing.
//!
//! The kernel maps are passed as descriptors too (no bpffs pin: both processes live at once,
//! and nothing is left behind in the file system if either dies). The program is attached to
//! `PEER` itself (not through a link, which would detach when the old process exits), so it
//! stays attached as long as the map lives. A successor whose eBPF object differs loads its
//! own program: the old process's spliced tunnels then stay and drain there.

pub mod notify;
pub mod wire;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

pub use wire::{Channel, Handed, KernelSockets, Message, Offer, WireError};

/// The environment variable that tells a successor which descriptor is its upgrade socket.
pub const UPGRADE_FD_ENV: &str = "WSPLICE_UPGRADE_FD";

/// How long the old process waits for its successor to serve.
pub const READY_WAIT: Duration = Duration::from_secs(30);

/// How long a successor waits for each message of the offer.
const OFFER_WAIT: Duration = Duration::from_secs(10);

/// Why an upgrade did not happen (the old process goes on serving).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The exchange with the other process failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The successor could not be started.
    #[error("cannot start the successor {program}: {source}")]
    Spawn {
        /// What was started.
        program: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The successor exited before it was ready.
    #[error("the successor exited before it was ready ({0}); its log says why")]
    SuccessorExited(std::process::ExitStatus),
    /// The successor answered out of turn.
    #[error("the successor answered out of turn: {0}")]
    Protocol(String),
    /// An upgrade is already under way, or the process is stopping.
    #[error("{0}")]
    Busy(&'static str),
    /// A descriptor could not be prepared.
    #[error("cannot prepare a descriptor for the successor: {0}")]
    Descriptor(#[source] std::io::Error),
    /// The environment names an upgrade socket that is not a number.
    #[error("{UPGRADE_FD_ENV}={0} is not a descriptor number")]
    BadEnvironment(String),
}

/// How this process was started: what a successor is started as.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The binary's path as it was when this process started (an upgrade installs the new
    /// binary there; `/proc/self/exe` would name the old, deleted one).
    pub program: PathBuf,
    /// The command line after the program name.
    pub args: Vec<OsString>,
}

impl Launch {
    /// This process's binary and arguments.
    pub fn of_this_process() -> std::io::Result<Launch> {
        Ok(Launch {
            program: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
        })
    }

    /// Starts the successor with `socket` (its end of the upgrade socket) inherited; stdout
    /// and stderr are shared, so both processes log to the same place.
    pub fn spawn(&self, socket: &OwnedFd) -> Result<std::process::Child, UpgradeError> {
        crate::sys::set_cloexec(socket.as_fd(), false).map_err(UpgradeError::Descriptor)?;
        let spawned = std::process::Command::new(&self.program)
            .args(&self.args)
            .env(UPGRADE_FD_ENV, socket.as_raw_fd().to_string())
            .stdin(std::process::Stdio::null())
            .spawn();
        // Only the child may keep it across exec (nothing else is started meanwhile: the
        // main thread starts successors, one at a time).
        let _ = crate::sys::set_cloexec(socket.as_fd(), true);
        spawned.map_err(|source| UpgradeError::Spawn {
            program: self.program.clone(),
            source,
        })
    }
}

/// The kernel maps a predecessor passed: `PEER`, `BRIDGE`, `ACTIVITY`, `PAUSED`, `PRESSURE`.
#[derive(Debug)]
pub struct KernelMaps {
    /// The hash of the object they were created from.
    pub object: u64,
    /// The five descriptors, in that order.
    pub fds: [OwnedFd; 5],
}

/// What a successor receives from its predecessor before it starts serving.
#[derive(Debug)]
pub struct Inherited {
    /// The upgrade socket (to answer `Ready` and receive tunnels).
    pub channel: Channel,
    /// The predecessor's process id.
    pub predecessor: u32,
    /// Listening sockets by address (several per address: one per predecessor worker).
    pub listeners: Vec<(SocketAddr, OwnedFd)>,
    /// The admin listener's socket.
    pub admin: Option<(SocketAddr, OwnedFd)>,
    /// The kernel program's maps.
    pub kernel: Option<KernelMaps>,
    /// This process adopted them (set by whoever loads the program): spliced tunnels may
    /// come.
    pub kernel_adopted: bool,
    /// The pools' servers the predecessor had set at run time.
    pub pools: crate::upstream::membership::RunTimeServers,
}

impl Inherited {
    /// The upgrade socket named by [`UPGRADE_FD_ENV`], if this process is a successor, and
    /// the offer read from it. The variable is removed, so a later successor does not see it.
    pub fn from_environment() -> Result<Option<Inherited>, UpgradeError> {
        let Some(value) = std::env::var_os(UPGRADE_FD_ENV) else {
            return Ok(None);
        };
        // Called first thing in `run`, before any other thread starts.
        std::env::remove_var(UPGRADE_FD_ENV);
        let text = value.to_string_lossy().into_owned();
        let raw: i32 = text
            .parse()
            .ok()
            .filter(|&fd| fd > 2)
            .ok_or(UpgradeError::BadEnvironment(text))?;
        // SAFETY: the predecessor started this process with that descriptor open and meant
        // for it alone; nothing else in this process knows the number.
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        crate::sys::set_cloexec(socket.as_fd(), true).map_err(UpgradeError::Descriptor)?;
        let channel = Channel::new(socket);
        Self::receive(channel).map(Some)
    }

    /// Reads the offer and every listening socket.
    fn receive(channel: Channel) -> Result<Inherited, UpgradeError> {
        let (message, fds) = channel.recv(OFFER_WAIT)?;
        let Message::Offer(offer) = message else {
            return Err(UpgradeError::Protocol("expected the offer first".into()));
        };
        let expected = wire::offer_descriptors(&offer);
        if fds.len() != expected {
            return Err(WireError::Descriptors {
                expected,
                got: fds.len(),
            }
            .into());
        }
        let mut fds = fds.into_iter();
        let admin = offer.admin.zip(fds.next());
        let kernel = match offer.kernel {
            Some(object) => {
                let mut take = || fds.next().ok_or(UpgradeError::Protocol("maps".into()));
                Some(KernelMaps {
                    object,
                    fds: [take()?, take()?, take()?, take()?, take()?],
                })
            }
            None => None,
        };
        let mut listeners = Vec::with_capacity(offer.listeners);
        while listeners.len() < offer.listeners {
            let (message, fds) = channel.recv(OFFER_WAIT)?;
            let Message::Listeners(addrs) = message else {
                return Err(UpgradeError::Protocol("expected listening sockets".into()));
            };
            listeners.extend(addrs.into_iter().zip(fds));
        }
        Ok(Inherited {
            channel,
            predecessor: offer.pid,
            listeners,
            admin,
            kernel,
            kernel_adopted: false,
            pools: offer.pools,
        })
    }

    /// Takes the inherited sockets listening on `addr` (none left: an empty list).
    pub fn take_listeners(&mut self, addr: SocketAddr) -> Vec<OwnedFd> {
        let (taken, kept) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|(bound, _)| *bound == addr);
        self.listeners = kept;
        taken.into_iter().map(|(_, fd)| fd).collect()
    }
}
