//! Least privilege (issue #14, finding 1): with `user`/`group` the running proxy is that user,
//! holds no capability (the documented set: none on this kernel, see `proxy/src/privileges.rs`),
//! cannot gain one, and still serves ws tunnels on both data paths and plain HTTP; and the
//! systemd unit's ambient capabilities are enough to start it without root at all.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use wsplice_tests::*;

/// `CAP_BPF`: the one capability the proxy keeps, and only on kernels that refuse map commands
/// on open descriptors without it (not Linux 6.5 and later).
const CAP_BPF: u64 = 1 << 39;

/// The fields of `/proc/PID/status` (or a thread's `/proc/PID/task/TID/status`).
fn status(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_owned(), value.trim().to_owned()))
        .collect()
}

fn capability_set(status: &BTreeMap<String, String>, name: &str) -> u64 {
    u64::from_str_radix(&status[name], 16).expect("hex capability set")
}

/// Checks every thread of `proxy` (credentials and capabilities are per thread): ids `uid` and
/// `gid` everywhere, no supplementary groups, no-new-privs, and no capability beyond CAP_BPF
/// (none on the userspace path), the log naming what is kept.
fn assert_unprivileged(proxy: &Proxy, uid: u32, gid: u32, what: &str) {
    let log = proxy.log();
    let dropped = log
        .lines()
        .find(|line| line.contains("privileges dropped"))
        .unwrap_or_else(|| panic!("{what}: no 'privileges dropped' line in:\n{log}"));
    let tasks = std::fs::read_dir(format!("/proc/{}/task", proxy.pid())).expect("task list");
    let mut threads = 0;
    for task in tasks {
        let status = status(&task.expect("task").path().join("status"));
        threads += 1;
        let ids = |name: &str| {
            status[name]
                .split_whitespace()
                .map(|id| id.parse::<u32>().expect("id"))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("Uid"), [uid; 4], "{what}: {status:?}");
        assert_eq!(ids("Gid"), [gid; 4], "{what}: {status:?}");
        assert_eq!(status["Groups"], "", "{what}: {status:?}");
        assert_eq!(status["NoNewPrivs"], "1", "{what}: {status:?}");
        let effective = capability_set(&status, "CapEff");
        assert_eq!(effective & !CAP_BPF, 0, "{what}: {status:?}");
        assert_eq!(capability_set(&status, "CapPrm"), effective, "{what}");
        assert_eq!(capability_set(&status, "CapInh"), 0, "{what}");
        assert_eq!(capability_set(&status, "CapAmb"), 0, "{what}");
        let documented = if effective == 0 { "none" } else { "CAP_BPF" };
        assert!(
            dropped.contains(&format!("capabilities={documented}")),
            "{what}: CapEff {effective:x}, but the log says: {dropped}"
        );
    }
    // The admin listener, the workers (and on the kernel path the pressure watcher) all run.
    assert!(threads >= 3, "{what}: {threads} threads");
}

/// A ws tunnel and a plain HTTP request through `proxy`; on the kernel path the tunnel must
/// have been spliced (map updates made after the drop).
async fn assert_serves(proxy: &Proxy, what: &str) {
    let mut ws = connect(&proxy.url("/unprivileged")).await;
    for text in ["one", "two", "three"] {
        echo_text(&mut ws, text).await;
    }
    bounded(futures_util::SinkExt::close(&mut ws))
        .await
        .expect("close");
    drop(ws);
    let (status, answer) = raw_exchange(
        proxy.addr(),
        b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{what}: {answer}");
    assert!(
        answer.trim_end().ends_with("wsplice echo: GET /plain"),
        "{what}: {answer}"
    );
    // The tunnel's access line is written when both sides have closed.
    let tunnel_line = || {
        proxy
            .access_lines()
            .into_iter()
            .find(|line| line["path"] == "/unprivileged")
    };
    assert!(
        eventually(|| tunnel_line().is_some()),
        "{what}: {}",
        proxy.log()
    );
    let tunnel = tunnel_line().expect("checked above");
    let expected = match proxy.datapath {
        DataPath::Kernel => "kernel",
        _ => "userspace",
    };
    assert_eq!(tunnel["datapath"], expected, "{what}: {tunnel}");
    if proxy.datapath == DataPath::Kernel {
        assert!(proxy.metrics()["tunnels_spliced_total"] >= 1, "{what}");
    }
}

/// A proxy in front of `echo` that switches to `nobody`/`nogroup` once it started.
fn as_nobody(echo: &Echo) -> ProxyConfig {
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.top_level = "user = \"nobody\"\ngroup = \"nogroup\"\n".into();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_user_the_running_proxy_holds_no_privilege_and_serves_both_data_paths() {
    if !is_root() {
        println!("skipped: dropping privileges is tested from root");
        return;
    }
    let echo = Echo::start();
    for datapath in [DataPath::Userspace, DataPath::Kernel] {
        let config = as_nobody(&echo);
        let proxy = Proxy::start(datapath, &config);
        let what = format!("{datapath:?}");
        assert_unprivileged(&proxy, 65534, 65534, &what);
        // Started as root, it also emptied its bounding set (CAP_BPF stays only if kept).
        let status = status(Path::new(&format!("/proc/{}/status", proxy.pid())));
        assert_eq!(
            capability_set(&status, "CapBnd") & !CAP_BPF,
            0,
            "{status:?}"
        );
        assert_serves(&proxy, &what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_dropped_root_upgrades_to_a_successor_as_unprivileged_as_itself() {
    if !is_root() {
        println!("skipped: dropping privileges is tested from root");
        return;
    }
    let echo = Echo::start();
    for datapath in [DataPath::Userspace, DataPath::Kernel] {
        let config = as_nobody(&echo);
        let mut proxy = Proxy::start(datapath, &config);
        let what = format!("{datapath:?} successor");
        let mut open = connect(&proxy.url("/before-the-upgrade")).await;
        echo_text(&mut open, "before").await;
        // Started by an unprivileged process, the successor binds nothing and loads nothing:
        // it takes the sockets and the maps over.
        let successor = proxy
            .upgrade()
            .unwrap_or_else(|error| panic!("{what}: {error}\n{}", proxy.log_tail(30)));
        assert_eq!(proxy.pid(), successor);
        assert_unprivileged(&proxy, 65534, 65534, &what);
        echo_text(&mut open, "after").await;
        assert_serves(&proxy, &what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_user_a_root_proxy_warns_once_that_it_stays_root() {
    if !is_root() {
        println!("skipped: needs root");
        return;
    }
    let echo = Echo::start();
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[echo.addr()]));
    let log = proxy.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("running as root"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("set `user`"), "{log}");
    let status = status(Path::new(&format!("/proc/{}/status", proxy.pid())));
    assert!(status["Uid"].starts_with("0\t"), "{status:?}");
}

#[test]
fn an_unknown_user_stops_the_start_with_a_clear_error() {
    let dir = scratch_dir("unknown-user");
    let config = dir.join("wsplice.toml");
    let port = free_port();
    std::fs::write(
        &config,
        format!(
            "user = \"wsplice-no-such-user\"\n\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n\n\
             [[route]]\nupstream = \"default\"\n\n[upstream.default]\nservers = [\"127.0.0.1:9\"]\n"
        ),
    )
    .unwrap();
    let log = dir.join("stderr.log");
    let mut process = Process::spawn(
        std::process::Command::new(binary())
            .args(["run", "--datapath", "userspace", "-c"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
    )
    .expect("start wsplice");
    let status = process.wait_exit(Duration::from_secs(10));
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "{status:?}: {stderr}"
    );
    assert!(
        stderr
            .contains("wsplice: user \"wsplice-no-such-user\" does not exist (config key `user`)"),
        "{stderr}"
    );
    // It stopped before binding anything.
    assert!(!stderr.contains("listening"), "{stderr}");
}

/// The capabilities of `AmbientCapabilities=` in deploy/systemd/wsplice.service, as setpriv
/// spells them (`+bpf,+net_admin,...`).
fn unit_ambient_capabilities() -> String {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/wsplice.service");
    let text = std::fs::read_to_string(&unit).expect("the systemd unit");
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix("AmbientCapabilities="))
        .expect("AmbientCapabilities= in the unit");
    for setting in ["User=wsplice", "NoNewPrivileges=yes"] {
        assert!(text.lines().any(|line| line == setting), "{setting}");
    }
    line.split_whitespace()
        .map(|cap| format!("+{}", cap.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_units_ambient_capabilities_start_it_without_root() {
    if !is_root() {
        println!("skipped: setpriv needs root to switch users");
        return;
    }
    let caps = unit_ambient_capabilities();
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    // As the unit: another user from the first instruction on (nobody stands in for wsplice),
    // only the unit's capabilities, inherited through the ambient set, and no-new-privs. A port
    // below 1024, like :443.
    config.wrapper = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        &format!("--inh-caps=-all,{caps}"),
        &format!("--ambient-caps=-all,{caps}"),
        &format!("--bounding-set=-all,{caps}"),
        "--no-new-privs",
        "--",
    ]
    .map(String::from)
    .to_vec();
    config.port = Some(free_port_in(600..1000));
    let proxy = Proxy::start(DataPath::Kernel, &config);
    // It loaded the program and bound the low port with those, then dropped them too (its
    // bounding set stays the unit's: emptying it would take CAP_SETPCAP, which the start does
    // not otherwise need, and no-new-privs already stops execve from granting anything).
    assert_unprivileged(&proxy, 65534, 65534, "systemd unit");
    assert_serves(&proxy, "systemd unit").await;
}
