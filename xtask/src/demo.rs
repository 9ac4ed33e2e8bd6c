//! `cargo xtask run`: the echo upstream and the proxy as children, stopped together.

use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus};

use anyhow::Context;

use crate::process::{self, GRACE, POLL_INTERVAL};

/// The echo upstream's address; `wsplice.toml` routes to it.
const ECHO_LISTEN: &str = "127.0.0.1:9001";

/// Starts both children and waits until Ctrl-C / SIGTERM or until either exits, then stops
/// both by PID. The exit code is the proxy's.
pub fn run(root: &Path, proxy_args: &[String]) -> anyhow::Result<ExitCode> {
    let binary = root.join("target/release/wsplice");
    process::catch_termination().context("cannot install the SIGINT/SIGTERM handlers")?;
    let mut echo = spawn(
        Command::new(&binary).args(["echo", "--listen", ECHO_LISTEN]),
        root,
    )
    .context("cannot start the echo upstream")?;
    let mut proxy = match spawn(
        Command::new(&binary)
            .args(["run", "-c", "wsplice.toml"])
            .args(proxy_args),
        root,
    ) {
        Ok(proxy) => proxy,
        Err(error) => {
            process::stop(&mut echo, GRACE);
            return Err(error).context("cannot start the proxy");
        }
    };
    print_banner();
    let ended = wait_for_an_end(&mut proxy, &mut echo);
    let echo_status = process::stop(&mut echo, GRACE);
    let proxy_status = match ended {
        End::Proxy(status) => Some(status),
        End::Echo(status) => {
            eprintln!("xtask: the echo upstream exited ({status}); stopping the proxy");
            process::stop(&mut proxy, GRACE)
        }
        End::Signal(signal) => {
            eprintln!("xtask: signal {signal} received; stopping the proxy and the echo upstream");
            process::stop(&mut proxy, GRACE)
        }
        End::Unwatchable(error) => {
            eprintln!("xtask: cannot wait for a child ({error}); stopping both");
            process::stop(&mut proxy, GRACE)
        }
    };
    if let Some(status) = echo_status.filter(|status| !status.success()) {
        eprintln!("xtask: the echo upstream ended with {status}");
    }
    let Some(status) = proxy_status else {
        anyhow::bail!("lost track of the proxy process");
    };
    if !status.success() {
        eprintln!("xtask: the proxy ended with {status}");
    }
    Ok(ExitCode::from(process::exit_code(status)))
}

/// In its own process group, so a terminal's Ctrl-C reaches only xtask, which then stops the
/// children in order (SIGTERM, then SIGKILL after a grace period).
fn spawn(command: &mut Command, root: &Path) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt as _;
    command.current_dir(root).process_group(0).spawn()
}

fn print_banner() {
    println!();
    println!("wsplice is running: ws://127.0.0.1:8080/ -> echo upstream {ECHO_LISTEN}");
    println!("  connect: python3 -m websockets ws://127.0.0.1:8080/   (pip install websockets),");
    println!("           or any WebSocket client");
    println!(
        "  plain:   curl http://127.0.0.1:8080/hello   (plain HTTP goes to the same upstream)"
    );
    println!("  metrics: curl http://127.0.0.1:9901/metrics");
    println!("  stop:    Ctrl-C");
    println!();
}

/// What ended the demo.
enum End {
    Proxy(ExitStatus),
    Echo(ExitStatus),
    Signal(libc::c_int),
    /// `waitpid` failed for a child: it cannot be watched any more.
    Unwatchable(std::io::Error),
}

fn wait_for_an_end(proxy: &mut Child, echo: &mut Child) -> End {
    loop {
        if let Some(signal) = process::termination_requested() {
            return End::Signal(signal);
        }
        match proxy.try_wait() {
            Ok(Some(status)) => return End::Proxy(status),
            Ok(None) => {}
            Err(error) => return End::Unwatchable(error),
        }
        match echo.try_wait() {
            Ok(Some(status)) => return End::Echo(status),
            Ok(None) => {}
            Err(error) => return End::Unwatchable(error),
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}
