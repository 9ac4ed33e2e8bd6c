//! The access log: one JSON line (target `wsplice::access`) per connection when it closes, and
//! per plain HTTP request when its answer is complete.

use std::net::SocketAddr;

use crate::tls::Negotiated;

/// What one connection did, for its access line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRecord {
    /// The connection's id (`"id"`, 16 hex digits): the same in every process that held it.
    pub id: u64,
    /// The client's address.
    pub client: SocketAddr,
    /// The upstream server, if one was chosen.
    pub upstream: Option<SocketAddr>,
    /// Host header as sent.
    pub host: String,
    /// Request target as sent.
    pub path: String,
    /// The request's method (empty before a request).
    pub method: String,
    /// 101 for a tunnel, the error or refusal status, or 0 when nothing was answered.
    pub status: u16,
    /// Bytes client → upstream once tunnelled.
    pub bytes_up: u64,
    /// Bytes upstream → client once tunnelled.
    pub bytes_down: u64,
    /// `userspace`, `kernel`, or empty before a tunnel.
    pub datapath: &'static str,
    /// From accept to close.
    pub duration_ms: u64,
    /// Why it closed.
    pub reason: String,
    /// It closed before a request head arrived (port probes, scanners).
    pub before_request: bool,
    /// TLS: what the handshake negotiated; `Some(None)` when it did not finish.
    pub tls: Option<Option<Negotiated>>,
}

impl AccessRecord {
    /// The JSON line.
    pub fn json(&self) -> serde_json::Value {
        let tls = self.tls.as_ref().map(|negotiated| match negotiated {
            Some(done) => serde_json::json!({
                "version": done.version,
                "suite": done.suite,
                "sni": done.server_name,
                "resumed": done.resumed,
            }),
            None => serde_json::json!({ "handshake": "unfinished" }),
        });
        serde_json::json!({
            "id": format!("{:016x}", self.id),
            "tls": tls,
            "client": self.client.to_string(),
            "upstream": self.upstream.map(|a| a.to_string()),
            "host": self.host,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "datapath": self.datapath,
            "duration_ms": self.duration_ms,
            "reason": self.reason,
        })
    }

    /// Writes the line; connections that never sent a request only log at debug level.
    pub fn log(&self) {
        if self.before_request {
            tracing::debug!(
                client = %self.client,
                reason = %self.reason,
                "connection closed before a request"
            );
            return;
        }
        tracing::info!(target: "wsplice::access", "{}", self.json());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_carries_every_field_and_the_tls_details() {
        let record = AccessRecord {
            id: 0x2a,
            client: "10.0.0.1:5000".parse().unwrap(),
            upstream: Some("10.0.0.2:80".parse().unwrap()),
            host: "example.com".into(),
            path: "/chat".into(),
            method: "GET".into(),
            status: 101,
            bytes_up: 3,
            bytes_down: 4,
            datapath: "kernel",
            duration_ms: 5,
            reason: "both sides closed".into(),
            before_request: false,
            tls: Some(None),
        };
        let line = record.json();
        assert_eq!(line["status"], 101);
        assert_eq!(line["upstream"], "10.0.0.2:80");
        assert_eq!(line["datapath"], "kernel");
        assert_eq!(line["tls"]["handshake"], "unfinished");
        assert_eq!(line["reason"], "both sides closed");
    }
}
