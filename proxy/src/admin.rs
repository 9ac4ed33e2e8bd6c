//! The admin listener: `GET /metrics` (Prometheus text), `/healthz` and `/readyz`.
//!
//! Off the hot path: one small blocking thread, one request per connection, short timeouts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;

/// Reads gauges that live elsewhere (e.g. eBPF map sizes) at scrape time.
pub type ExtraGauges = Box<dyn Fn() -> Vec<(&'static str, &'static str, u64)> + Send + Sync>;

/// The admin listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the admin listener on {addr}: {source}")]
pub struct AdminError {
    /// The configured address.
    pub addr: SocketAddr,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr` and serves the admin endpoints from a background thread.
pub fn spawn(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    extra: ExtraGauges,
) -> Result<(), AdminError> {
    let error = |source| AdminError { addr, source };
    let listener = TcpListener::bind(addr).map_err(error)?;
    std::thread::Builder::new()
        .name("wsplice-admin".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = answer(stream, &metrics, &extra) {
                    tracing::debug!(error = %e, "admin request failed");
                }
            }
        })
        .map_err(error)?;
    tracing::info!(%addr, "admin listener: /metrics /healthz /readyz");
    Ok(())
}

fn answer(mut stream: TcpStream, metrics: &Metrics, extra: &ExtraGauges) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut head = [0u8; 2048];
    let mut len = 0;
    while len < head.len() && !head[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut head[len..])?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let (status, body) = route(&head[..len], metrics, extra);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}

fn route(head: &[u8], metrics: &Metrics, extra: &ExtraGauges) -> (&'static str, String) {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    match (parts.next(), parts.next()) {
        (Some(b"GET"), Some(b"/metrics")) => ("200 OK", metrics.render(&extra())),
        (Some(b"GET"), Some(b"/healthz")) | (Some(b"GET"), Some(b"/readyz")) => {
            ("200 OK", "ok\n".into())
        }
        (Some(b"GET"), Some(_)) => ("404 Not Found", "not found\n".into()),
        _ => ("405 Method Not Allowed", "GET only\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_extra() -> ExtraGauges {
        Box::new(Vec::new)
    }

    #[test]
    fn routes_metrics_health_and_unknown_paths() {
        let metrics = Metrics::default();
        metrics.tunnels_opened.inc();
        let (status, body) = route(b"GET /metrics HTTP/1.1\r\n\r\n", &metrics, &no_extra());
        assert_eq!(status, "200 OK");
        assert!(body.contains("wsplice_tunnels_opened_total 1"));
        assert_eq!(
            route(b"GET /healthz HTTP/1.1\r\n\r\n", &metrics, &no_extra()).0,
            "200 OK"
        );
        assert_eq!(
            route(b"GET /x HTTP/1.1\r\n\r\n", &metrics, &no_extra()).0,
            "404 Not Found"
        );
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n", &metrics, &no_extra()).0,
            "405 Method Not Allowed"
        );
    }

    #[test]
    fn serves_over_tcp() {
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        spawn(port, Arc::new(Metrics::default()), no_extra()).unwrap();
        let mut stream = TcpStream::connect(port).unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("ok\n"));
    }
}
