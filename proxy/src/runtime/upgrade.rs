//! Binary upgrade, the main thread's part (see `crate::upgrade`): in the old process,
//! starting the successor, offering it the sockets and maps, and forwarding the tunnels the
//! workers let go; in the successor, answering that it serves and passing the tunnels that
//! come to its workers.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::handover::Moving;
use super::reload::Published;
use crate::splice::SpliceProgram;
use crate::sys;
use crate::upgrade::wire::{LISTENERS_PER_MESSAGE, TUNNELS_PER_MESSAGE};
use crate::upgrade::{Channel, Handed, Launch, Message, Offer, UpgradeError, READY_WAIT};
use crate::upstream::membership::RunTimeServers;

/// How long the workers have to give copies of their listening sockets.
const LISTENER_WAIT: Duration = Duration::from_secs(5);
/// Largest offer sent with the run-time servers in it (well under a socket's send buffer).
const MAX_POOLS_IN_OFFER: usize = 128 * 1024;

/// The old process's side of upgrades.
#[derive(Debug)]
pub struct Upgrader {
    launch: Launch,
    published: Arc<Published>,
    workers: usize,
    /// A copy of the admin listener's socket, and its address.
    admin: Option<(std::net::SocketAddr, OwnedFd)>,
    splice: Option<Arc<SpliceProgram>>,
}

/// A successor that serves: the thread forwarding tunnels to it.
#[derive(Debug)]
pub struct Started {
    /// The successor's process id.
    pub pid: u32,
    forwarder: JoinHandle<()>,
}

impl Started {
    /// Waits for the forwarding thread (after every worker is done and the hand-off closed).
    pub fn finish(self) {
        if self.forwarder.join().is_err() {
            tracing::error!("upgrade: the forwarding thread panicked");
        }
    }
}

impl Upgrader {
    /// Upgrades of a process started as `launch`.
    pub fn new(
        launch: Launch,
        published: Arc<Published>,
        workers: usize,
        admin: Option<(std::net::SocketAddr, OwnedFd)>,
        splice: Option<Arc<SpliceProgram>>,
    ) -> Upgrader {
        Upgrader {
            launch,
            published,
            workers,
            admin,
            splice,
        }
    }

    /// Starts the successor and waits until it serves; on any failure it is stopped and
    /// nothing here changed. Once it serves, the workers' tunnels are forwarded to it from
    /// their drain on (the caller starts the drain).
    pub fn start(&mut self, pools: RunTimeServers) -> Result<Started, UpgradeError> {
        let listeners = self.listener_copies()?;
        let (ours, theirs) = sys::seqpacket_pair().map_err(UpgradeError::Descriptor)?;
        let mut child = self.launch.spawn(&theirs)?;
        drop(theirs);
        let channel = Channel::new(ours);
        match self.offer(&channel, &listeners, pools, &mut child) {
            Ok((pid, kernel)) => {
                let (sink, tunnels) = std::sync::mpsc::channel();
                self.published.handoff.open(sink, kernel);
                let published = Arc::clone(&self.published);
                let forwarder = std::thread::Builder::new()
                    .name("wsplice-upgrade".into())
                    .spawn(move || forward(&channel, &tunnels, pid, &published.handoff))
                    .map_err(UpgradeError::Descriptor)?;
                tracing::info!(
                    successor = pid,
                    spliced_tunnels_move = kernel,
                    "upgrade: the successor took over the listeners; handing over the tunnels"
                );
                Ok(Started { pid, forwarder })
            }
            Err(error) => {
                // Stopped by its PID, and reaped.
                let _ = child.kill();
                let _ = child.wait();
                Err(error)
            }
        }
    }

    /// Copies of every worker's listening sockets.
    fn listener_copies(&self) -> Result<Vec<(std::net::SocketAddr, OwnedFd)>, UpgradeError> {
        let handoff = &self.published.handoff;
        handoff.request_listeners();
        let deadline = Instant::now() + LISTENER_WAIT;
        while handoff.answered() < self.workers {
            if Instant::now() > deadline {
                return Err(UpgradeError::Busy(
                    "the workers did not give their listening sockets in time",
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(handoff
            .take_listener_copies()
            .into_iter()
            .flatten()
            .collect())
    }

    /// Sends the offer and the listening sockets; waits for `Ready`. The successor's id and
    /// whether it adopted the kernel maps.
    fn offer(
        &self,
        channel: &Channel,
        listeners: &[(std::net::SocketAddr, OwnedFd)],
        pools: RunTimeServers,
        child: &mut std::process::Child,
    ) -> Result<(u32, bool), UpgradeError> {
        let mut offer = Offer {
            pid: std::process::id(),
            listeners: listeners.len(),
            admin: self.admin.as_ref().map(|(addr, _)| *addr),
            kernel: self.splice.as_ref().map(|_| crate::splice::object_hash()),
            pools,
        };
        // One message carries the offer: a socket's send buffer (about 200 KB) bounds it.
        if serde_json::to_vec(&offer).map_or(0, |bytes| bytes.len()) > MAX_POOLS_IN_OFFER {
            tracing::warn!(
                "upgrade: the servers set at run time are too many to hand over; the successor \
                 starts from the file's (set them again)"
            );
            offer.pools = RunTimeServers::new();
        }
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        if let Some((_, admin)) = &self.admin {
            fds.push(admin.as_fd());
        }
        if let Some(program) = &self.splice {
            fds.extend(program.offer());
        }
        channel.send(&Message::Offer(offer), &fds)?;
        for chunk in listeners.chunks(LISTENERS_PER_MESSAGE) {
            let addrs = chunk.iter().map(|(addr, _)| *addr).collect();
            let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd)| fd.as_fd()).collect();
            channel.send(&Message::Listeners(addrs), &fds)?;
        }
        let deadline = Instant::now() + READY_WAIT;
        loop {
            match channel.recv(Duration::from_millis(200)) {
                Ok((Message::Ready { pid, kernel }, _)) => return Ok((pid, kernel)),
                Ok((other, _)) => {
                    return Err(UpgradeError::Protocol(format!("{other:?}")));
                }
                Err(crate::upgrade::WireError::TimedOut(_)) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(UpgradeError::SuccessorExited(status));
                    }
                }
                Err(crate::upgrade::WireError::Closed) => {
                    // It exited (or closed the socket); give it a moment to be reaped.
                    for _ in 0..50 {
                        if let Ok(Some(status)) = child.try_wait() {
                            return Err(UpgradeError::SuccessorExited(status));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    return Err(crate::upgrade::WireError::Closed.into());
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
}

/// Sends the tunnels the workers let go, in batches, until every worker is done; then
/// `Done`.
fn forward(
    channel: &Channel,
    tunnels: &Receiver<Moving>,
    successor: u32,
    handoff: &super::handover::Handoff,
) {
    let mut handed = 0u64;
    let mut lost = 0u64;
    let mut batch: Vec<Moving> = Vec::with_capacity(TUNNELS_PER_MESSAGE);
    let mut open = true;
    while open {
        match tunnels.recv_timeout(Duration::from_millis(200)) {
            Ok(moving) => batch.push(moving),
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
        while batch.len() < TUNNELS_PER_MESSAGE {
            match tunnels.try_recv() {
                Ok(moving) => batch.push(moving),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let records: Vec<Handed> = batch.iter().map(|moving| moving.handed.clone()).collect();
        let fds: Vec<BorrowedFd<'_>> = batch
            .iter()
            .flat_map(|moving| [moving.client.as_fd(), moving.upstream.as_fd()])
            .collect();
        if handoff.has_failed() {
            lost += batch.len() as u64;
        } else {
            match channel.send(&Message::Tunnels(records), &fds) {
                Ok(()) => handed += batch.len() as u64,
                Err(error) => {
                    // The successor is gone: the workers keep what they still hold.
                    handoff.fail();
                    lost += batch.len() as u64;
                    tracing::error!(
                        %error,
                        "upgrade: the successor stopped taking tunnels; the rest stay here and \
                         drain"
                    );
                }
            }
        }
        // The successor has its own descriptors now (or the tunnels are lost): ours close.
        batch.clear();
    }
    if let Err(error) = channel.send(&Message::Done { handed }, &[]) {
        tracing::warn!(%error, "upgrade: cannot tell the successor that everything is handed over");
    }
    tracing::info!(
        successor,
        tunnels = handed,
        lost,
        "upgrade: handed over {handed} tunnels to the successor"
    );
}

/// The successor's side once it serves: tells the predecessor, then gives each tunnel that
/// comes to a worker in turn, until the predecessor is done.
pub fn adopt_tunnels(
    channel: Channel,
    predecessor: u32,
    kernel: bool,
    workers: Vec<super::handover::Deliveries>,
    published: Arc<Published>,
) -> std::io::Result<JoinHandle<()>> {
    let pid = std::process::id();
    published.handoff.set_adopting(true);
    if let Err(error) = channel.send(&Message::Ready { pid, kernel }, &[]) {
        tracing::error!(%error, predecessor, "upgrade: cannot tell the predecessor that this process serves");
    }
    crate::upgrade::notify::notify(&format!("MAINPID={pid}\nREADY=1"));
    std::thread::Builder::new()
        .name("wsplice-adopt".into())
        .spawn(move || {
            let mut adopted = 0u64;
            let mut next = 0usize;
            // Until the predecessor is done (or gone), even if this process is asked to stop:
            // what it sends is ours to close politely then.
            loop {
                let (message, fds) = match channel.recv(Duration::from_millis(500)) {
                    Ok(received) => received,
                    Err(crate::upgrade::WireError::TimedOut(_)) => continue,
                    Err(crate::upgrade::WireError::Closed) => break,
                    Err(error) => {
                        tracing::error!(%error, "upgrade: a message from the predecessor is unusable");
                        continue;
                    }
                };
                match message {
                    Message::Tunnels(tunnels) => {
                        let mut fds = fds.into_iter();
                        for handed in tunnels {
                            let (Some(client), Some(upstream)) = (fds.next(), fds.next()) else {
                                break;
                            };
                            let worker = &workers[next % workers.len()];
                            next += 1;
                            worker.deliver(Moving {
                                handed,
                                client,
                                upstream,
                            });
                            adopted += 1;
                        }
                    }
                    Message::Done { .. } => break,
                    other => {
                        tracing::warn!(?other, "upgrade: unexpected message from the predecessor");
                    }
                }
            }
            published.handoff.set_adopting(false);
            tracing::info!(predecessor, tunnels = adopted, "upgrade: adopted {adopted} tunnels from the predecessor");
        })
}
