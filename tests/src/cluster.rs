//! A small network of namespaces for cluster tests: a bridge in a hub namespace and one
//! namespace per member (a load balancer, proxy hosts, upstreams, clients), each with its own
//! address on `10.77.0.0/24`. Everything is made by the test and removed when it drops: the
//! processes first (by PID), then the namespaces. Nothing reaches beyond them.
//!
//! The test itself reaches into a namespace from a thread that entered it ([`in_netns`]):
//! sockets a thread opens live in its namespace, and so do the threads it starts (a tokio
//! runtime built there, say).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{binary, scratch_dir, Process};

/// The network's addresses: `10.77.0.HOST/24`.
pub fn address(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, host)
}

/// Runs `ip ARGS`, panicking with its output if it fails.
fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e}"));
    assert!(
        output.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A network namespace the test made; deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    /// Its name (`ip netns` lists it under `/run/netns/`).
    pub name: String,
}

impl Netns {
    /// Creates namespace `name` with its loopback up.
    pub fn add(name: String) -> Netns {
        // A namespace left over by a run that was killed: removed first.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// `command` to run inside the namespace (`ip netns exec` execs it: the PID is its own).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The namespaces on one bridge.
#[derive(Debug)]
pub struct Lan {
    members: Vec<(String, Netns, Ipv4Addr)>,
    // Dropped last: the members' veth ends go with their namespaces, then the bridge.
    _hub: Netns,
}

impl Lan {
    /// A hub with a bridge and, for each `(role, host)`, a namespace with `10.77.0.HOST` on
    /// its `eth0`, attached to the bridge. Names carry the test's PID, so concurrent runs do
    /// not meet.
    pub fn build(members: &[(&str, u8)]) -> Lan {
        let prefix = format!("wc{}", std::process::id() % 100_000);
        let hub = Netns::add(format!("{prefix}hub"));
        ip(&["-n", &hub.name, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub.name, "link", "set", "br0", "up"]);
        let mut built = Vec::new();
        for (index, &(role, host)) in members.iter().enumerate() {
            let ns = Netns::add(format!("{prefix}{role}"));
            let (outer, inner) = (format!("{prefix}v{index}"), format!("{prefix}e{index}"));
            ip(&[
                "-n", &hub.name, "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                "netns", &ns.name,
            ]);
            ip(&["-n", &hub.name, "link", "set", &outer, "master", "br0"]);
            ip(&["-n", &hub.name, "link", "set", &outer, "up"]);
            ip(&["-n", &ns.name, "link", "set", &inner, "name", "eth0"]);
            let cidr = format!("{}/24", address(host));
            ip(&["-n", &ns.name, "addr", "add", &cidr, "dev", "eth0"]);
            ip(&["-n", &ns.name, "link", "set", "eth0", "up"]);
            built.push((role.to_owned(), ns, address(host)));
        }
        Lan {
            members: built,
            _hub: hub,
        }
    }

    /// The namespace of `role`.
    pub fn ns(&self, role: &str) -> &Netns {
        self.members
            .iter()
            .find(|(name, ..)| name == role)
            .map(|(_, ns, _)| ns)
            .unwrap_or_else(|| panic!("no member {role}"))
    }

    /// The address of `role`.
    pub fn addr(&self, role: &str) -> Ipv4Addr {
        self.members
            .iter()
            .find(|(name, ..)| name == role)
            .map(|(.., addr)| *addr)
            .unwrap_or_else(|| panic!("no member {role}"))
    }
}

/// Runs `work` on a thread that entered namespace `ns` (and so do the sockets and threads it
/// makes); its result.
pub fn in_netns<T: Send + 'static>(ns: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let path = PathBuf::from("/run/netns").join(ns);
    std::thread::spawn(move || {
        let file =
            std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        // SAFETY: setns with a namespace descriptor this thread holds open; it changes only
        // this thread's network namespace.
        let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
        work()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Starts `work` on a thread that entered namespace `ns` (see [`in_netns`]); join it for its
/// result.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || in_netns(&ns, work))
}

/// A process started in a namespace, with its log file.
#[derive(Debug)]
pub struct Member {
    /// The process (killed by PID when dropped).
    pub process: Process,
    /// Its stderr and stdout.
    pub log: PathBuf,
}

impl Member {
    /// Starts `program ARGS` in `ns`, logging to a scratch file named after `what`.
    pub fn start(
        ns: &Netns,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        what: &str,
    ) -> Member {
        let log = scratch_dir(what).join("log");
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = ns.command(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        let process = Process::spawn(&mut command).unwrap_or_else(|e| panic!("start {what}: {e}"));
        Member { process, log }
    }

    /// A `wsplice` subcommand in `ns`.
    pub fn wsplice(ns: &Netns, args: &[&str], what: &str) -> Member {
        Member::start(ns, binary(), args, what)
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Waits from namespace `ns` until `addr` accepts TCP connections (at most 10 s).
pub fn wait_listening(ns: &str, addr: SocketAddr) {
    let listening = in_netns(ns, move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    });
    assert!(listening, "nothing listens on {addr} (seen from {ns})");
}
