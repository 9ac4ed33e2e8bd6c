//! The PROXY protocol header of a `proxy_protocol` listener: the first phase of a connection
//! behind an L4 load balancer (HAProxy in TCP mode, IPVS, a cloud NLB).
//!
//! The header is read by peeking and consumed only once it is complete, so what follows it
//! (a TLS ClientHello, a request head) is read as if the connection had begun there: TLS and
//! the kernel path never see it. Only a peer in `trusted_proxies` may send one (from anyone
//! else it would be a forged client address); a connection from anyone else, or whose first
//! bytes are not a valid header, is closed without an answer (it may not even speak HTTP),
//! counted in `wsplice_proxy_headers_refused_total` and logged with the reason.
//!
//! Once it is read, the client's address is the header's: for `X-Real-IP`,
//! `X-Forwarded-For`, access lines, `max_connections_per_ip` (counted only now, so the load
//! balancer's own address never counts against it) and `consistent_hash`.

use super::{Action, Actions, Connection, Side, Stage};
use crate::proxy_protocol::{parse, MAX_HEADER_LEN};
use crate::services::Services;

impl Connection {
    /// A `proxy_protocol` listener accepted the connection: peek for the header, if its peer
    /// may send one.
    pub(super) fn expect_proxy_header(&mut self, services: &Services, out: &mut Actions) {
        let peer = self.client_addr.ip();
        let trusted = services
            .trusted_proxies
            .iter()
            .any(|range| range.contains(peer));
        if !trusted {
            return self.refuse_proxy_header(
                format!("PROXY header expected from {peer}, which is not in trusted_proxies"),
                services,
                out,
            );
        }
        out.push_back(Action::PeekClient { seen: 0 });
    }

    /// What the client has sent so far, peeked at while its PROXY header is awaited.
    pub fn on_proxy_header_peeked(&mut self, bytes: &[u8], services: &Services, out: &mut Actions) {
        let Stage::ReadingProxyHeader { seen, local, .. } = self.stage else {
            return;
        };
        if self.is_closing() {
            return;
        }
        if seen > 0 && bytes.len() <= seen {
            // Woken with nothing new: the peek waits for more than `seen` bytes, so only the
            // end of the stream (or an error) wakes it now.
            return self.refuse_proxy_header(
                format!("client closed in the middle of its PROXY header ({seen} bytes)"),
                services,
                out,
            );
        }
        match parse(bytes) {
            Ok(None) if bytes.len() >= MAX_HEADER_LEN => self.refuse_proxy_header(
                format!("PROXY header longer than {MAX_HEADER_LEN} bytes"),
                services,
                out,
            ),
            Ok(None) => {
                self.stage = Stage::ReadingProxyHeader {
                    seen: bytes.len(),
                    refused: false,
                    local,
                };
                out.push_back(Action::PeekClient { seen: bytes.len() });
            }
            Ok(Some((header, len))) => {
                out.push_back(Action::ConsumeClient { len });
                // LOCAL (the balancer's own health check) and address families without
                // ports keep the connection's own addresses.
                // An IPv4 client in a TCP6 header (a dual-stack balancer) is the same client
                // as in a TCP4 one: for per-address limits, hashing and trusted_proxies alike.
                let canonical = |addr: std::net::SocketAddr| {
                    std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port())
                };
                let mut local = local;
                if let Some(addresses) = header.addresses {
                    self.client_addr = canonical(addresses.source);
                    local = canonical(addresses.destination);
                }
                self.begin_after_proxy_header(local, services, out);
            }
            Err(error) => {
                self.refuse_proxy_header(format!("bad PROXY header: {error}"), services, out)
            }
        }
    }

    /// The header is read: count the client's address, then read its request (to `local`).
    fn begin_after_proxy_header(
        &mut self,
        local: std::net::SocketAddr,
        services: &Services,
        out: &mut Actions,
    ) {
        let client = self.client_addr.ip();
        if services.admission.admit_address(client).is_err() {
            services.metrics.connections_refused_per_ip.inc();
            self.mark_refused();
            let reason =
                format!("limits.max_connections_per_ip connections are open from {client}");
            return self.close(reason, false, out);
        }
        self.stage = Stage::ReadingRequest(Box::new(self.new_handshake(local, services)));
        out.push_back(Action::Read(Side::Client));
    }

    /// Closes a connection whose PROXY header is refused: counted, and logged with `reason`
    /// (unlike a connection that closed without sending anything, a balancer's TCP check).
    pub(super) fn refuse_proxy_header(
        &mut self,
        reason: String,
        services: &Services,
        out: &mut Actions,
    ) {
        services.metrics.proxy_headers_refused.inc();
        self.mark_refused();
        self.close(reason, false, out);
    }

    /// The connection is refused in this phase: its access line is written at info level.
    fn mark_refused(&mut self) {
        if let Stage::ReadingProxyHeader { refused, .. } = &mut self.stage {
            *refused = true;
        }
    }
}
