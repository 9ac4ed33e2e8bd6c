//! The connection lifecycle without sockets.
