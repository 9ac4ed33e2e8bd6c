//! The packet splice's hand-off and bookkeeping, carried out by a worker (the connection
//! decides when: `connection/packet.rs`; the program and its entries: `splice::packet`).
//!
//! The hand-off, in order:
//! 1. both sockets must be quiet in the kernel too: nothing unacknowledged or unsent, nothing
//!    unread (else: not quiet, try again shortly);
//! 2. both flows go into the map as held: from now on their packets are dropped before they
//!    reach the sockets (the ends resend them);
//! 3. the sockets are checked again (a packet may have arrived between 1 and 2), then read
//!    in repair mode: sequence numbers, timestamp clocks, window scales, options;
//! 4. the tunnel must be eligible (timestamps, SACK, window scaling, MSS, one family), and
//!    where each connection's packets leave is looked up;
//! 5. both entries are filled in and made active;
//! 6. the sockets stay in repair mode and are closed once their polls are cancelled: no FIN,
//!    no reset.
//!
//! Any failure before step 5 takes the entries out and leaves repair mode, so the tunnel goes
//! on where it was.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use socket2::SockRef;
use wsplice_common::packet::{FlowEntry, FlowKey, CLOSED, FLOW_HOLD, RESET_SEEN};

use super::table::{Entry, EntryIo, Intent};
use super::worker::Worker;
use crate::connection::Side;
use crate::connection::{FlowReport, PacketRefusal};
use crate::splice::packet::program::PacketFlows;
use crate::splice::packet::reset::Resetter;
use crate::splice::packet::route::{Egress, RouteLookup};
use crate::splice::packet::socket_state::{self, SocketState};
use crate::splice::packet::translation::{flow_key, socket_address, Endpoint, Flows};
use crate::splice::SpliceError;

/// A worker's handles for the packet splice.
#[derive(Debug)]
pub struct PacketWorker {
    /// Its own descriptor of the flows map.
    pub flows: PacketFlows,
    /// Its own route socket.
    routes: RouteLookup,
    /// Writes the resets of tunnels the proxy ends itself.
    resetter: Resetter,
}

impl PacketWorker {
    /// Handles for a worker.
    pub fn open(path: &crate::splice::packet::PacketPath) -> Result<PacketWorker, SpliceError> {
        let routes = RouteLookup::open().map_err(|error| SpliceError::Route(error.to_string()))?;
        Ok(PacketWorker {
            flows: path.program.flows()?,
            routes,
            resetter: Resetter::default(),
        })
    }
}

/// What a connection of the packet path keeps for the packet splice, in one allocation (its
/// entry's `packet`): set when its upstream connection takes a reserved port, completed at the
/// hand-off. It outlives the connection's sockets: a packet-spliced tunnel is this and its
/// lifecycle record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketState {
    /// The local port the upstream connection took from the reserved range. Given back when
    /// the connection ends, or when a retry connects to another server; kept for the next
    /// process when it is left the tunnel (`leave_pinned_packet_tunnels`); claimed again by
    /// the process that adopts it.
    pub port: Option<TakenPort>,
    /// The tunnel's flows, once handed over to the packet splice.
    pub flows: Option<HandedFlows>,
}

impl PacketState {
    /// Records `port` as the one the upstream connection took.
    pub fn set_port(state: &mut Option<Box<PacketState>>, port: TakenPort) {
        state.get_or_insert_with(Box::default).port = Some(port);
    }

    /// Takes the recorded port out (to give it back); the state goes with it unless the
    /// tunnel's flows are recorded too.
    pub fn take_port(state: &mut Option<Box<PacketState>>) -> Option<TakenPort> {
        let port = state.as_mut()?.port.take();
        if state.as_ref().is_some_and(|state| state.flows.is_none()) {
            *state = None;
        }
        port
    }

    /// Whether the upstream connection holds a reserved port.
    pub fn has_port(state: &Option<Box<PacketState>>) -> bool {
        state.as_ref().is_some_and(|state| state.port.is_some())
    }
}

/// The keys of a tunnel's two flows in the packet splice's map, once handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandedFlows {
    /// Packets from the client, packets from the upstream.
    pub keys: [FlowKey; 2],
}

/// The local port an upstream connection took from the packet splice's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TakenPort {
    /// The upstream server.
    pub remote: SocketAddr,
    /// The port.
    pub port: u16,
}

/// The address the allocator keys ports by: the upstream socket binds to the unspecified
/// address of the server's family (the kernel picks the source address at connect).
pub fn unspecified_for(remote: SocketAddr) -> IpAddr {
    match remote {
        SocketAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

impl Worker {
    /// Carries out [`Action::PacketSplice`](crate::connection::Action::PacketSplice) for
    /// `slot`.
    pub(super) fn packet_splice(&mut self, slot: u32) -> Result<(), PacketRefusal> {
        let Some(entry) = self.table.get(slot) else {
            return Err(failed("the connection is gone"));
        };
        if !PacketState::has_port(&entry.packet) {
            return Err(PacketRefusal::Ineligible {
                label: "busy",
                reason: "its upstream connection has no port of the reserved range (all taken)"
                    .into(),
            });
        }
        let Some((Some(client), Some(upstream))) = entry
            .io()
            .map(|io| (io.client.fd.as_ref(), io.upstream.fd.as_ref()))
        else {
            return Err(failed("a socket is missing"));
        };
        let (client, upstream) = (client.as_fd(), upstream.as_fd());
        let Some(packet) = self.packet.as_mut() else {
            return Err(failed("the packet splice is not loaded"));
        };
        check_quiet(client, upstream)?;
        let keys = [keys_of(client)?, keys_of(upstream)?];
        // Step 2: held (the program drops their packets, the ends resend them).
        for key in keys {
            let held = FlowEntry {
                state: FLOW_HOLD,
                ..FlowEntry::default()
            };
            if let Err(error) = packet.flows.insert(&key, &held) {
                remove_keys(&mut packet.flows, &keys);
                return Err(failed(&format!("cannot insert a flow: {error}")));
            }
        }
        let result = read_both(client, upstream).and_then(|(client_state, upstream_state)| {
            let flows = translate(&mut packet.routes, &client_state, &upstream_state)?;
            for (key, entry) in [flows.from_client, flows.from_upstream] {
                packet
                    .flows
                    .insert(&key, &entry)
                    .map_err(|error| failed(&format!("cannot activate a flow: {error}")))?;
            }
            Ok(())
        });
        if let Err(refusal) = result {
            remove_keys(&mut packet.flows, &keys);
            let _ = socket_state::leave_repair(client);
            let _ = socket_state::leave_repair(upstream);
            return Err(refusal);
        }
        // Step 6: the sockets' operations are cancelled; the sockets stay with the record,
        // in repair mode, until every operation that names them has completed (a descriptor
        // closed earlier could be reused by a new connection while a cancel still names its
        // number), then they are closed silently (`close_handed_sockets`).
        let Some(entry) = self.table.get(slot) else {
            return Ok(());
        };
        // The state exists: the port was checked above (the hand-off needs one).
        entry.packet.get_or_insert_with(Box::default).flows = Some(HandedFlows { keys });
        if let Some(io) = entry.io_mut() {
            for side in [Side::Client, Side::Upstream] {
                let io = io.side(side);
                io.intent = Intent::None;
                if io.polling {
                    io.poll_removed = true;
                }
            }
        }
        let fds = entry.raw_fds();
        for fd in fds.into_iter().filter(|&fd| fd >= 0) {
            self.cancel_fd(slot, fd);
        }
        Ok(())
    }

    /// What the program recorded for a packet-spliced tunnel (`None`: its flows are gone).
    pub(super) fn packet_report(&self, record: &HandedFlows) -> Option<FlowReport> {
        let packet = self.packet.as_ref()?;
        let up = packet.flows.get(&record.keys[0])?;
        let down = packet.flows.get(&record.keys[1])?;
        let last_ns = up.last_ns.max(down.last_ns);
        Some(FlowReport {
            last_ns,
            closed_ns: if (up.flags | down.flags) & CLOSED != 0 {
                last_ns
            } else {
                0
            },
            reset: (up.flags | down.flags) & RESET_SEEN != 0,
            bytes: (up.bytes, down.bytes),
        })
    }

    /// A packet-spliced tunnel ended: its flows leave the map. When the ends had not closed
    /// it themselves (the proxy's idle timeout, its drain), each gets a reset first, at the
    /// sequence number it expects next, so it learns now rather than at its next send.
    pub(super) fn forget_packet_flows(&mut self, record: &HandedFlows) {
        let Some(packet) = self.packet.as_mut() else {
            return;
        };
        let entries = [
            packet.flows.get(&record.keys[0]),
            packet.flows.get(&record.keys[1]),
        ];
        if let [Some(up), Some(down)] = entries {
            if (up.flags | down.flags) & CLOSED == 0 {
                let family = record.keys[0].family;
                for entry in [down, up] {
                    let source = socket_address(entry.saddr, entry.sport, family);
                    let destination = socket_address(entry.daddr, entry.dport, family);
                    if let Err(error) = packet.resetter.send(source, destination, entry.seq_next) {
                        tracing::warn!(%error, %destination, "packet splice: cannot send a reset");
                    }
                }
            }
        }
        remove_keys(&mut packet.flows, &record.keys);
    }

    /// The first worker takes over the packet-spliced tunnels a previous process left in the
    /// pinned map: each becomes a record without sockets here (no I/O state at all), its
    /// upstream port claimed again.
    pub(super) fn adopt_pinned_packet_tunnels(&mut self) {
        let Some(path) = self.services.packet.clone() else {
            return;
        };
        if self.index != 0 {
            return;
        }
        let tunnels = std::mem::take(
            &mut *path
                .adopted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let now = crate::clock::monotonic_ns();
        for [(client_key, up), (upstream_key, _)] in tunnels {
            let family = client_key.family;
            let client = socket_address(client_key.saddr, client_key.sport, family);
            let upstream = socket_address(up.daddr, up.dport, family);
            let port = u16::from_be_bytes(up.sport.to_ne_bytes());
            let local = unspecified_for(upstream);
            let port = path
                .ports
                .claim(local, upstream, port)
                .then_some(TakenPort {
                    remote: upstream,
                    port,
                });
            let mut first = crate::connection::Actions::new();
            let id = self.table.next_id();
            let conn = crate::connection::Connection::adopt_packet(
                id,
                client,
                upstream,
                now,
                &self.services,
                &mut first,
            );
            self.services.admission.count(client.ip());
            let state = PacketState {
                port,
                flows: Some(HandedFlows {
                    keys: [client_key, upstream_key],
                }),
            };
            let slot = self.table.insert(Entry::new(
                conn,
                std::sync::Arc::clone(&self.services),
                None,
                Some(Box::new(state)),
                false,
            ));
            self.drive(slot, |_, _, out| out.append(&mut first));
        }
    }

    /// Shutdown with pinned flows: packet-spliced tunnels are left to the next process (their
    /// records end here without touching the flows).
    pub(super) fn leave_pinned_packet_tunnels(&mut self) {
        if !self
            .services
            .packet
            .as_ref()
            .is_some_and(|path| path.pinned)
        {
            return;
        }
        for slot in self.table.slots() {
            let Some(entry) = self.table.get(slot) else {
                continue;
            };
            if entry.packet_flows().is_none() {
                continue;
            }
            // The flows and the port stay the tunnel's: the next process claims the port
            // again, and this one neither forgets the flows nor gives the port back.
            entry.packet = None;
            // Its sockets, if their operations are still in flight (their I/O state, which
            // such an operation may point into, goes with the entry once none is).
            if let Some(io) = entry.io_mut() {
                for socket in [io.client.fd.take(), io.upstream.fd.take()]
                    .into_iter()
                    .flatten()
                {
                    close_handed_socket(socket);
                }
            }
            self.drive(slot, |conn, _, out| conn.leave_pinned(out));
        }
    }

    /// Closes a packet-spliced tunnel's sockets, silently, once no operation names them: its
    /// I/O state goes with them (buffers back to the pool), and the entry keeps only the
    /// tunnel's record.
    pub(super) fn close_handed_sockets(&mut self, slot: u32) {
        let Some(io) = self.table.get(slot).and_then(Entry::drop_io) else {
            return;
        };
        self.close_handed_io(io);
    }

    /// A packet-spliced tunnel's I/O state ends: any buffer goes back to the pool, the
    /// sockets close without a FIN or a reset.
    pub(super) fn close_handed_io(&mut self, mut io: Box<EntryIo>) {
        self.give_back_buffers(&mut io);
        for socket in [io.client.fd.take(), io.upstream.fd.take()]
            .into_iter()
            .flatten()
        {
            close_handed_socket(socket);
        }
    }
}

/// Closes a socket handed to the packet splice without a FIN or a reset (it is in repair
/// mode already; entering it again is harmless). One that cannot be silenced stays open:
/// closing it would reset an end whose connection lives on in the program.
pub(super) fn close_handed_socket(socket: OwnedFd) {
    if let Err(error) = socket_state::close_silently(socket) {
        tracing::warn!(error = %error.source, "packet splice: a socket could not be closed silently; it is kept");
        std::mem::forget(error.socket);
    }
}

fn failed(reason: &str) -> PacketRefusal {
    PacketRefusal::Ineligible {
        label: "failed",
        reason: reason.to_owned(),
    }
}

/// Step 1 (and 3): nothing in flight or unread on either socket.
fn check_quiet(client: BorrowedFd<'_>, upstream: BorrowedFd<'_>) -> Result<(), PacketRefusal> {
    for (name, fd) in [("client", client), ("upstream", upstream)] {
        let pending = socket_state::pending(fd)
            .map_err(|error| failed(&format!("cannot read the {name} socket's queues: {error}")))?;
        if pending.urgent {
            return Err(PacketRefusal::Ineligible {
                label: "urgent",
                reason: format!("the {name} socket has urgent data"),
            });
        }
        if !pending.is_quiet() {
            return Err(PacketRefusal::NotQuiet(format!(
                "the {name} socket has {} bytes unacknowledged and {} unread",
                pending.unacknowledged, pending.unread
            )));
        }
    }
    Ok(())
}

/// The key of the packets that arrive on `socket`.
fn keys_of(socket: BorrowedFd<'_>) -> Result<FlowKey, PacketRefusal> {
    let socket = SockRef::from(&socket);
    let address = |which: std::io::Result<socket2::SockAddr>| {
        which
            .ok()
            .and_then(|address| address.as_socket())
            .ok_or_else(|| failed("a socket has no address"))
    };
    let local = address(socket.local_addr())?;
    let peer = address(socket.peer_addr())?;
    Ok(flow_key(peer, local))
}

/// Step 3: quiet again, then both sockets read in repair mode.
fn read_both(
    client: BorrowedFd<'_>,
    upstream: BorrowedFd<'_>,
) -> Result<(SocketState, SocketState), PacketRefusal> {
    check_quiet(client, upstream)?;
    let read = |fd, name: &str| {
        socket_state::read_in_repair(fd)
            .map_err(|error| failed(&format!("cannot read the {name} socket: {error}")))
    };
    let client_state = read(client, "client")?;
    let upstream_state = match read(upstream, "upstream") {
        Ok(state) => state,
        Err(refusal) => {
            let _ = socket_state::leave_repair(client);
            return Err(refusal);
        }
    };
    socket_state::eligibility(&client_state, &upstream_state).map_err(|ineligible| {
        PacketRefusal::Ineligible {
            label: ineligible.label(),
            reason: ineligible.to_string(),
        }
    })?;
    Ok((client_state, upstream_state))
}

/// Step 4 and 5's entries.
fn translate(
    routes: &mut RouteLookup,
    client: &SocketState,
    upstream: &SocketState,
) -> Result<Flows, PacketRefusal> {
    let mut endpoint = |state: &SocketState| -> Result<Endpoint, PacketRefusal> {
        let egress = routes
            .egress(state.local.ip(), state.peer.ip())
            .map_err(|error| failed(&format!("no route to {}: {error}", state.peer)))?;
        Ok(Endpoint {
            local: state.local,
            peer: state.peer,
            send_next: state.send_next,
            receive_next: state.receive_next,
            timestamp: state.timestamp,
            peer_scale: state.send_scale,
            own_scale: state.receive_scale,
            egress_ifindex: match egress {
                Egress::Local => 0,
                Egress::Interface(index) => index,
            },
        })
    };
    let client = endpoint(client)?;
    let upstream = endpoint(upstream)?;
    Ok(Flows::new(&client, &upstream))
}

fn remove_keys(flows: &mut PacketFlows, keys: &[FlowKey; 2]) {
    for key in keys {
        flows.remove(key);
    }
}
