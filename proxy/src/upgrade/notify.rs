//! The service manager's readiness protocol (`sd_notify`): a datagram to `$NOTIFY_SOCKET`.
//! With `Type=notify` and `NotifyAccess=all`, systemd learns that the proxy serves, and, after
//! a binary upgrade, which process is now the main one (`MAINPID=`), so it neither waits for
//! the old one nor stops the new one when the old one exits.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`) to the service manager, if one asked for it; failures are
/// logged, never fatal (the proxy serves either way).
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            socket.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(error) = sent {
        tracing::warn!(%error, state, "cannot notify the service manager");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_reaches_the_socket_named_by_the_environment() {
        let dir = std::env::temp_dir().join(format!("wsplice-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).expect("bind");
        // The only test that sets NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify("READY=1\nMAINPID=42");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buffer = [0u8; 64];
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .expect("timeout");
        let n = receiver.recv(&mut buffer).expect("a datagram");
        assert_eq!(&buffer[..n], b"READY=1\nMAINPID=42");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
