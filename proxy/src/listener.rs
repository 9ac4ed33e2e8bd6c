//! Listening sockets: one `SO_REUSEPORT` socket per worker, so the kernel spreads new
//! connections over the workers with no shared accept queue and no lock.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use socket2::{Domain, Protocol, Socket, Type};

use crate::headers::Scheme;

/// Backlog of each listening socket (capped by `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// A bound, listening socket and the scheme it serves.
#[derive(Debug)]
pub struct Listener {
    /// The listening socket (blocking mode: io_uring waits for connections itself).
    pub socket: OwnedFd,
    /// Where it listens.
    pub addr: SocketAddr,
    /// `ws` or `wss` (the TLS configuration of a `wss` listener is part of the services: a
    /// reload can change it).
    pub scheme: Scheme,
}

/// Binding a listener failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The address that could not be bound.
    pub addr: SocketAddr,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

impl Listener {
    /// A socket already listening on `addr` (handed over by a predecessor process).
    pub fn adopt(socket: OwnedFd, addr: SocketAddr, tls: bool) -> Listener {
        Listener {
            socket,
            addr,
            scheme: if tls { Scheme::Wss } else { Scheme::Ws },
        }
    }

    /// Binds `addr` with `SO_REUSEPORT` (every worker binds its own socket to the same address);
    /// with `tls` it serves `wss://`.
    pub fn bind(addr: SocketAddr, tls: bool) -> Result<Listener, BindError> {
        let bind = || -> std::io::Result<Socket> {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_cloexec(true)?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.bind(&addr.into())?;
            socket.listen(BACKLOG)?;
            Ok(socket)
        };
        let socket = bind().map_err(|source| BindError { addr, source })?;
        Ok(Listener {
            socket: socket.into(),
            addr,
            scheme: if tls { Scheme::Wss } else { Scheme::Ws },
        })
    }
}
