//! The systems under test: direct (no proxy), nginx, HAProxy, wsplice on each data path
//! (userspace, kernel from the 101, auto: userspace then promoted); their
//! configurations (equivalent headers and timeouts), how they are started, pinned and stopped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::tls::TlsFiles;

/// Port of the shared echo upstream (the one the alternation uses).
pub const ECHO_PORT: u16 = 19001;
/// Port of the pinned echo upstream of the per-core runs.
pub const PINNED_ECHO_PORT: u16 = 19002;

/// One system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Nginx,
    Haproxy,
    WspliceUserspace,
    WspliceKernel,
    WspliceAuto,
}

/// The order of the alternation.
pub const ALL: [Kind; 6] = [
    Kind::Direct,
    Kind::Nginx,
    Kind::Haproxy,
    Kind::WspliceUserspace,
    Kind::WspliceKernel,
    Kind::WspliceAuto,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::WspliceUserspace => "wsplice userspace",
            Kind::WspliceKernel => "wsplice kernel",
            Kind::WspliceAuto => "wsplice auto",
        }
    }

    /// The ws:// port (direct: the echo upstream's).
    pub fn port(self, echo_port: u16) -> u16 {
        match self {
            Kind::Direct => echo_port,
            Kind::Nginx => 19080,
            Kind::WspliceKernel => 19081,
            Kind::WspliceUserspace => 19082,
            Kind::Haproxy => 19083,
            Kind::WspliceAuto => 19084,
        }
    }

    /// The wss:// port (direct has none: the echo upstream speaks plain ws).
    fn tls_port(self) -> Option<u16> {
        match self {
            Kind::Direct => None,
            Kind::Nginx => Some(19480),
            Kind::WspliceKernel => Some(19481),
            Kind::WspliceUserspace => Some(19482),
            Kind::Haproxy => Some(19483),
            Kind::WspliceAuto => Some(19484),
        }
    }

    fn datapath(self) -> &'static str {
        match self {
            Kind::WspliceKernel => "kernel",
            Kind::WspliceAuto => "auto",
            _ => "userspace",
        }
    }
}

/// How a target runs.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Worker threads or processes per proxy process (nginx: worker processes in total).
    pub workers: usize,
    /// Proxy processes on the same port (SO_REUSEPORT), for more than one process's fds.
    pub processes: usize,
    /// `taskset -c` CPU list for the proxy.
    pub pin: Option<&'static str>,
    /// Also listen for wss://.
    pub tls: bool,
    /// The echo upstream behind it.
    pub echo_port: u16,
}

/// Binaries and files the targets need.
pub struct Tools {
    pub wsplice: PathBuf,
    pub nginx: PathBuf,
    pub haproxy: PathBuf,
    pub work: PathBuf,
    pub tls: Option<TlsFiles>,
    /// Why this wsplice build cannot serve wss (its `wsplice check` refused a TLS listener).
    pub wsplice_tls_refused: Option<String>,
}

/// A process killed by PID when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        crate::process::stop(&mut self.0, crate::process::GRACE);
    }
}

/// Whether the target serves wss:// and where.
#[derive(Debug, Clone)]
pub enum Wss {
    Port(u16),
    Unavailable(String),
}

/// A started target: stopped (every process by PID) when dropped.
pub struct Running {
    _guards: Vec<Guard>,
    /// The proxy's processes (RSS accounting), workers included.
    pub pids: Vec<u32>,
    pub port: u16,
    pub wss: Wss,
}

/// Starts `command` (under `taskset -c pin` when pinned: taskset execs it, the PID stays its own).
pub fn spawn(
    program: &Path,
    args: &[&str],
    pin: Option<&str>,
    log: &Path,
    envs: &[(&str, &str)],
) -> anyhow::Result<Guard> {
    let mut command = match pin {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus]).arg(program);
            c
        }
        None => Command::new(program),
    };
    command.args(args).envs(envs.iter().copied());
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    Ok(Guard(child))
}

/// Fails when something already listens on `port` (a leftover process would be measured instead).
pub fn ensure_free(port: u16) -> anyhow::Result<()> {
    if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        bail!("127.0.0.1:{port} is already in use: stop whatever listens there first");
    }
    Ok(())
}

/// Waits until `port` accepts connections and every process of `guards` still runs.
pub fn wait_port(port: u16, guards: &mut [Guard], log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            // A process that failed to bind (the port taken after all) has exited by now.
            std::thread::sleep(Duration::from_millis(100));
            for guard in guards.iter_mut() {
                if let Ok(Some(status)) = guard.0.try_wait() {
                    let tail = std::fs::read_to_string(log).unwrap_or_default();
                    bail!("it exited ({status}) after {port} opened: {}", tail.trim());
                }
            }
            return Ok(());
        }
        for guard in guards.iter_mut() {
            if let Ok(Some(status)) = guard.0.try_wait() {
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                bail!(
                    "it exited ({status}) before listening on {port}: {}",
                    tail.trim()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on 127.0.0.1:{port}")
}

/// Starts the echo upstream.
pub fn start_echo(
    wsplice: &Path,
    port: u16,
    pin: Option<&str>,
    work: &Path,
) -> anyhow::Result<Guard> {
    let mut group = start_echo_group(wsplice, port, pin, work, 1)?;
    group.pop().context("no echo process started")
}

/// `processes` echo upstreams sharing `port` (SO_REUSEPORT): one process holds at most its
/// 20,000 fds' worth of connections.
pub fn start_echo_group(
    wsplice: &Path,
    port: u16,
    pin: Option<&str>,
    work: &Path,
    processes: usize,
) -> anyhow::Result<Vec<Guard>> {
    ensure_free(port)?;
    let log = work.join(format!("echo-{port}.log"));
    let listen = format!("127.0.0.1:{port}");
    let mut guards = Vec::new();
    for _ in 0..processes.max(1) {
        guards.push(spawn(
            wsplice,
            &["echo", "--listen", &listen],
            pin,
            &log,
            &[("RUST_LOG", "warn")],
        )?);
    }
    wait_port(port, &mut guards, &log)?;
    // Every process has bound its socket before traffic starts (the port answers as soon as
    // the first one has).
    std::thread::sleep(Duration::from_millis(300));
    Ok(guards)
}

/// Starts `kind` as `layout` says.
pub fn start(kind: Kind, layout: &Layout, tools: &Tools) -> anyhow::Result<Running> {
    let port = kind.port(layout.echo_port);
    let tls_port = if layout.tls { kind.tls_port() } else { None };
    let tls_files = tools.tls.as_ref().filter(|_| tls_port.is_some());
    let work = &tools.work;
    if kind != Kind::Direct {
        ensure_free(port)?;
        if let Some(p) = tls_port {
            ensure_free(p)?;
        }
    }
    let mut wss = match (kind, tls_port, tls_files) {
        (Kind::Direct, ..) => Wss::Unavailable("n/a (the echo upstream has no TLS)".into()),
        (_, Some(p), Some(_)) => Wss::Port(p),
        _ => Wss::Unavailable("n/a (no TLS files)".into()),
    };
    let (mut guards, log) = match kind {
        Kind::Direct => {
            return Ok(Running {
                _guards: Vec::new(),
                pids: Vec::new(),
                port,
                wss,
            })
        }
        Kind::Nginx => {
            let conf = work.join("nginx.conf");
            let tls = tls_port.zip(tls_files);
            std::fs::write(&conf, nginx_config(work, layout, port, tls))?;
            let log = work.join("nginx.stderr");
            let conf = conf.to_string_lossy().into_owned();
            let prefix = work.to_string_lossy().into_owned();
            let guard = spawn(
                &tools.nginx,
                &["-c", &conf, "-p", &prefix],
                layout.pin,
                &log,
                &[],
            )?;
            (vec![guard], log)
        }
        Kind::Haproxy => {
            let conf = work.join("haproxy.cfg");
            let tls = tls_port.zip(tls_files);
            std::fs::write(&conf, haproxy_config(layout, port, tls))?;
            let log = work.join("haproxy.stderr");
            let conf = conf.to_string_lossy().into_owned();
            let mut guards = Vec::new();
            for _ in 0..layout.processes {
                // -db: foreground, no master: the PID is HAProxy's own.
                guards.push(spawn(
                    &tools.haproxy,
                    &["-db", "-f", &conf],
                    layout.pin,
                    &log,
                    &[],
                )?);
            }
            (guards, log)
        }
        Kind::WspliceUserspace | Kind::WspliceKernel | Kind::WspliceAuto => {
            let datapath = kind.datapath();
            let conf = work.join(format!("wsplice-{datapath}.toml"));
            let tls = match (tls_port.zip(tls_files), &tools.wsplice_tls_refused) {
                (Some(tls), None) => Some(tls),
                // The reason is in the report's notes, once.
                (Some(_), Some(_)) => {
                    wss = Wss::Unavailable("n/a (TLS not supported by this build)".into());
                    None
                }
                (None, _) => None,
            };
            std::fs::write(&conf, wsplice_config(port, layout.echo_port, tls))?;
            let log = work.join(format!("wsplice-{datapath}.log"));
            let conf = conf.to_string_lossy().into_owned();
            let workers = layout.workers.to_string();
            let mut guards = Vec::new();
            for _ in 0..layout.processes {
                guards.push(spawn(
                    &tools.wsplice,
                    &[
                        "run",
                        "-c",
                        &conf,
                        "--datapath",
                        datapath,
                        "--workers",
                        &workers,
                    ],
                    layout.pin,
                    &log,
                    &[("RUST_LOG", "warn")],
                )?);
            }
            (guards, log)
        }
    };
    wait_port(port, &mut guards, &log)?;
    if let Wss::Port(p) = wss {
        wait_port(p, &mut guards, &log)?;
    }
    // Every process of the target has bound its socket (SO_REUSEPORT) before traffic starts.
    std::thread::sleep(Duration::from_millis(300));
    Ok(Running {
        pids: pids_of(&guards),
        _guards: guards,
        port,
        wss,
    })
}

/// nginx as people run it in front of a ws backend (the headers wsplice rewrites, long read timeout).
/// `reuseport` spreads connections evenly over the workers (each has its own fd limit). Plain
/// HTTP requests go over kept-alive upstream connections (`keepalive 64`, `Connection` cleared
/// unless upgrading), with no cap on requests per connection on either side: the http workload
/// measures steady keep-alive, not reconnects.
fn nginx_config(work: &Path, layout: &Layout, port: u16, tls: Option<(u16, &TlsFiles)>) -> String {
    let echo = layout.echo_port;
    let workers = layout.workers * layout.processes;
    // Debian's nginx 1.22 offers TLS 1.2 at most unless told (1.23.4 added 1.3 to the default):
    // every target speaks TLS 1.3 so the wss rows compare the same handshake.
    let tls = tls.map_or(String::new(), |(p, files)| {
        format!(
            "    listen 127.0.0.1:{p} ssl reuseport;\n    ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_certificate {};\n    ssl_certificate_key {};\n",
            files.cert.display(),
            files.key.display()
        )
    });
    format!(
        "daemon off;\nmaster_process on;\nworker_processes {workers};\nworker_rlimit_nofile 19500;\n\
         pid {pid};\nerror_log stderr warn;\n\
         events {{ worker_connections 19000; }}\n\
         http {{\n  access_log off;\n\
           map $http_upgrade $connection_upgrade {{ default upgrade; '' \"\"; }}\n\
           upstream echo {{ server 127.0.0.1:{echo}; keepalive 64; keepalive_requests 1000000; }}\n\
           server {{\n    listen 127.0.0.1:{port} reuseport;\n    keepalive_requests 1000000;\n{tls}    location / {{\n\
{NGINX_WS_LOCATION}    }}\n  }}\n}}\n",
        pid = work.join("nginx.pid").display()
    )
}

/// The body of nginx's `location /` in front of a ws backend, as people write it (the headers
/// wsplice rewrites, a long read timeout); every nginx target of the bench uses it.
pub(super) const NGINX_WS_LOCATION: &str = "      proxy_pass http://echo;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $http_host;
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
";

/// HAProxy equivalent of the nginx config: http mode, `timeout tunnel`, X-Forwarded-For
/// (`option forwardfor`), X-Real-IP and X-Forwarded-Proto set, Host passed through; plain HTTP
/// keeps client connections alive and shares idle upstream connections (`http-reuse always`).
fn haproxy_config(layout: &Layout, port: u16, tls: Option<(u16, &TlsFiles)>) -> String {
    let echo = layout.echo_port;
    let threads = layout.workers;
    let tls = tls.map_or(String::new(), |(p, files)| {
        format!(
            "  bind 127.0.0.1:{p} ssl crt {}\n",
            files.combined.display()
        )
    });
    // Two fds per tunnel: 9,700 tunnels fit the 20,000-fd hard limit of one process.
    format!(
        "global\n  nbthread {threads}\n  maxconn 9700\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 3600s\n\
         timeout server 3600s\n  timeout tunnel 3600s\n  option forwardfor\n\
           option http-keep-alive\n\
         frontend ws\n  bind 127.0.0.1:{port}\n{tls}\
           http-request set-header X-Real-IP %[src]\n\
           http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}\n\
           http-request set-header X-Forwarded-Proto http if !{{ ssl_fc }}\n\
           default_backend echo\n\
         backend echo\n  http-reuse always\n  server echo 127.0.0.1:{echo}\n"
    )
}

/// wsplice with the same listeners and upstream; plain HTTP keeps as many idle upstream
/// connections per worker as nginx does (`keepalive = 64`).
pub fn wsplice_config(port: u16, echo: u16, tls: Option<(u16, &TlsFiles)>) -> String {
    let tls = tls.map_or(String::new(), |(p, files)| {
        format!(
            "[[listener]]\nbind = \"127.0.0.1:{p}\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            files.cert.display(),
            files.key.display()
        )
    });
    format!(
        "[[listener]]\nbind = \"127.0.0.1:{port}\"\n{tls}[[route]]\nupstream = \"echo\"\n\
         [upstream.echo]\nservers = [\"127.0.0.1:{echo}\"]\nkeepalive = 64\n[timeouts]\nidle = \"3600s\"\n"
    )
}

/// The processes `guards` started and their children (e.g. nginx's workers): what a target's
/// RSS and CPU are read from.
pub fn pids_of(guards: &[Guard]) -> Vec<u32> {
    guards
        .iter()
        .flat_map(|guard| {
            let pid = guard.0.id();
            std::iter::once(pid).chain(children_of(pid))
        })
        .collect()
}

pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let after = stat.rsplit_once(") ")?.1.to_owned();
                    after.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            workers: 1,
            processes: 2,
            pin: Some("0"),
            tls: false,
            echo_port: PINNED_ECHO_PORT,
        }
    }

    #[test]
    fn haproxy_config_matches_the_nginx_one() {
        let config = haproxy_config(&layout(), 19083, None);
        for needed in [
            "mode http",
            "timeout tunnel 3600s",
            "option forwardfor",
            "set-header X-Real-IP %[src]",
            "set-header X-Forwarded-Proto http if !{ ssl_fc }",
            "nbthread 1",
            "server echo 127.0.0.1:19002",
            "option http-keep-alive",
            "http-reuse always",
        ] {
            assert!(config.contains(needed), "missing {needed:?} in\n{config}");
        }
    }

    #[test]
    fn nginx_runs_one_worker_per_process_on_a_reuseport_listener() {
        let config = nginx_config(Path::new("/tmp"), &layout(), 19080, None);
        assert!(config.contains("worker_processes 2;"));
        assert!(config.contains("listen 127.0.0.1:19080 reuseport;"));
        assert!(config.contains("proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"));
        // Plain HTTP reuses upstream connections: Connection is cleared unless upgrading.
        assert!(config.contains("keepalive 64;"));
        assert!(config.contains("default upgrade; '' \"\";"));
        assert!(config.contains("proxy_http_version 1.1;"));
    }
}
