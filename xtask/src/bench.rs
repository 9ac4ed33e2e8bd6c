//! `cargo xtask bench`: side-by-side runs of the same load generator against the echo upstream
//! directly, through nginx (Debian package) and through wsplice on both data paths.
//! Reports ratios measured in one run: a markdown table and JSON under `benches/results/`.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Ports the suite uses on 127.0.0.1.
const ECHO_PORT: u16 = 19001;
const NGINX_PORT: u16 = 19080;
const KERNEL_PORT: u16 = 19081;
const USERSPACE_PORT: u16 = 19082;

/// How large the runs are.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Seconds per throughput/latency run.
    pub seconds: f64,
    /// Idle tunnels in the hold workload.
    pub hold: usize,
}

impl Scale {
    /// The full suite (about 3 minutes).
    pub const FULL: Scale = Scale {
        seconds: 5.0,
        hold: 8000,
    };
    /// A quick pass (under a minute).
    pub const QUICK: Scale = Scale {
        seconds: 2.0,
        hold: 1000,
    };
}

/// A process killed by PID when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        crate::process::stop(&mut self.0, crate::process::GRACE);
    }
}

/// One system under test.
struct Target {
    name: &'static str,
    port: u16,
}

pub fn bench(root: &Path, scale: Scale) -> anyhow::Result<()> {
    let nginx = ensure_nginx()?;
    let wsplice = root.join("target/release/wsplice");
    let load = root.join("target/release/wsplice-load");
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work)?;
    // Many short-lived loopback connections: let new connects reuse TIME_WAIT ports.
    let _ = std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1");

    let _echo = spawn(
        Command::new(&wsplice).args(["echo", "--listen", &format!("127.0.0.1:{ECHO_PORT}")]),
        ECHO_PORT,
        &work.join("echo.log"),
    )?;
    let targets = [
        Target {
            name: "direct",
            port: ECHO_PORT,
        },
        Target {
            name: "nginx",
            port: NGINX_PORT,
        },
        Target {
            name: "wsplice userspace",
            port: USERSPACE_PORT,
        },
        Target {
            name: "wsplice kernel",
            port: KERNEL_PORT,
        },
    ];
    let mut rows: Vec<(String, Vec<f64>)> = vec![
        ("bulk 1 tunnel, MB/s".into(), vec![]),
        ("bulk 16 tunnels, MB/s".into(), vec![]),
        (
            "storm: new tunnels/s (upgrade + echo + close), 64 in parallel".into(),
            vec![],
        ),
        ("latency p50 at 64 conns, µs".into(), vec![]),
        ("latency p99 at 64 conns, µs".into(), vec![]),
        (
            format!("proxy RSS per idle tunnel ({} held), KB", scale.hold),
            vec![],
        ),
        (
            format!(
                "kernel slab per idle tunnel, all its sockets ({} held), KB",
                scale.hold
            ),
            vec![],
        ),
    ];
    for target in &targets {
        println!("==> {}", target.name);
        let (_proxy, pids) = start_target(target, &nginx, &wsplice, &work)?;
        let url = format!("ws://127.0.0.1:{}/bench", target.port);
        let run = |args: &[&str]| load_json(&load, &url, args);
        let seconds = scale.seconds.to_string();
        let bulk1 = run(&["bulk", "--conns", "1", "--seconds", &seconds])?;
        let bulk16 = run(&["bulk", "--conns", "16", "--seconds", &seconds])?;
        let storm = run(&["storm", "--conns", "64", "--seconds", &seconds])?;
        let latency = run(&["latency", "--conns", "64", "--seconds", &seconds])?;
        let (rss, slab) = hold(&load, &url, scale.hold, &pids)?;
        let values = [
            bulk1["mb_per_s"].as_f64().unwrap_or(0.0),
            bulk16["mb_per_s"].as_f64().unwrap_or(0.0),
            storm["per_second"].as_f64().unwrap_or(0.0),
            latency["p50_us"].as_f64().unwrap_or(0.0),
            latency["p99_us"].as_f64().unwrap_or(0.0),
            rss,
            slab,
        ];
        for (row, value) in rows.iter_mut().zip(values) {
            row.1.push(value);
        }
        println!("    {values:?}");
    }
    report(root, &targets, &rows, scale)
}

fn ensure_nginx() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from("/usr/sbin/nginx");
    if path.is_file() {
        return Ok(path);
    }
    println!("==> installing nginx from Debian packages");
    let ok = Command::new("apt-get").arg("update").status()?.success()
        && Command::new("apt-get")
            .args(["install", "-y", "nginx-light"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?
            .success();
    if !ok || !path.is_file() {
        bail!("cannot install nginx (apt-get install nginx-light)");
    }
    Ok(path)
}

fn spawn(command: &mut Command, port: u16, log: &Path) -> anyhow::Result<Guard> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    let guard = Guard(child);
    wait_port(port)?;
    Ok(guard)
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on 127.0.0.1:{port}")
}

/// Starts the system under test; returns its guard and the PIDs whose RSS counts as its own.
fn start_target(
    target: &Target,
    nginx: &Path,
    wsplice: &Path,
    work: &Path,
) -> anyhow::Result<(Option<Guard>, Vec<u32>)> {
    match target.name {
        "direct" => Ok((None, Vec::new())),
        "nginx" => {
            let conf = work.join("nginx.conf");
            std::fs::write(&conf, nginx_config(work))?;
            let guard = spawn(
                Command::new(nginx)
                    .args(["-c"])
                    .arg(&conf)
                    .args(["-p"])
                    .arg(work),
                target.port,
                &work.join("nginx.stderr"),
            )?;
            let master = guard.0.id();
            std::thread::sleep(Duration::from_millis(200));
            let mut pids = children_of(master);
            pids.push(master);
            Ok((Some(guard), pids))
        }
        _ => {
            let datapath = if target.name.ends_with("kernel") {
                "kernel"
            } else {
                "userspace"
            };
            let conf = work.join(format!("wsplice-{datapath}.toml"));
            std::fs::write(&conf, wsplice_config(target.port))?;
            let guard = spawn(
                Command::new(wsplice)
                    .args(["run", "-c"])
                    .arg(&conf)
                    .args(["--datapath", datapath])
                    .env("RUST_LOG", "warn"),
                target.port,
                &work.join(format!("wsplice-{datapath}.log")),
            )?;
            let pid = guard.0.id();
            Ok((Some(guard), vec![pid]))
        }
    }
}

/// nginx as people run it in front of a ws backend (DESIGN.md §3 headers, long read timeout).
fn nginx_config(work: &Path) -> String {
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\nworker_rlimit_nofile 19000;\n\
         pid {pid};\nerror_log stderr warn;\n\
         events {{ worker_connections 18000; }}\n\
         http {{\n  access_log off;\n\
           map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n\
           upstream echo {{ server 127.0.0.1:{ECHO_PORT}; }}\n\
           server {{\n    listen 127.0.0.1:{NGINX_PORT};\n    location / {{\n\
               proxy_pass http://echo;\n      proxy_http_version 1.1;\n\
               proxy_set_header Upgrade $http_upgrade;\n\
               proxy_set_header Connection $connection_upgrade;\n\
               proxy_set_header Host $http_host;\n\
               proxy_set_header X-Real-IP $remote_addr;\n\
               proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
               proxy_set_header X-Forwarded-Proto $scheme;\n\
               proxy_read_timeout 3600s;\n    }}\n  }}\n}}\n",
        pid = work.join("nginx.pid").display()
    )
}

fn wsplice_config(port: u16) -> String {
    format!(
        "workers = 2\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n[[route]]\nupstream = \"echo\"\n\
         [upstream.echo]\nservers = [\"127.0.0.1:{ECHO_PORT}\"]\n[timeouts]\nidle = \"3600s\"\n"
    )
}

fn children_of(parent: u32) -> Vec<u32> {
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

fn load_json(load: &Path, url: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let output = Command::new(load)
        .args(&args[..1])
        .args(["--url", url])
        .args(&args[1..])
        .output()
        .context("cannot run wsplice-load")?;
    if !output.status.success() {
        bail!(
            "wsplice-load {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .last()
        .context("wsplice-load printed nothing")?;
    Ok(serde_json::from_str(line)?)
}

fn rss_kb(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .sum()
}

/// Kernel slab memory: sockets, psocks, map entries (page cache noise excluded).
fn slab_kb() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("Slab:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}

/// Opens `conns` idle tunnels; returns (proxy RSS KB per tunnel, kernel slab KB per tunnel).
fn hold(load: &Path, url: &str, conns: usize, pids: &[u32]) -> anyhow::Result<(f64, f64)> {
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = rss_kb(pids);
    let slab_before = slab_kb();
    let mut child = Command::new(load)
        .args(["hold", "--url", url, "--conns", &conns.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run wsplice-load hold")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = lines.next().transpose()?.unwrap_or_default();
    if ready.trim() != "ready" {
        let _ = child.kill();
        bail!("hold did not get ready: {ready}");
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss = (rss_kb(pids) - rss_before) / conns as f64;
    let slab = (slab_kb() - slab_before) / conns as f64;
    drop(child.stdin.take());
    let _ = child.wait();
    // Let the closes settle before the next run.
    std::thread::sleep(Duration::from_secs(1));
    Ok((rss, slab))
}

fn report(
    root: &Path,
    targets: &[Target],
    rows: &[(String, Vec<f64>)],
    scale: Scale,
) -> anyhow::Result<()> {
    let mut table = String::from("| metric |");
    for target in targets {
        table.push_str(&format!(" {} |", target.name));
    }
    table.push_str(" kernel / nginx | kernel / userspace |\n|---|");
    for _ in 0..targets.len() + 2 {
        table.push_str("---:|");
    }
    table.push('\n');
    for (name, values) in rows {
        table.push_str(&format!("| {name} |"));
        for value in values {
            table.push_str(&format!(" {value:.1} |"));
        }
        let ratio = |a: f64, b: f64| {
            if b.abs() > f64::EPSILON {
                format!("{:.2}", a / b)
            } else {
                "-".into()
            }
        };
        table.push_str(&format!(
            " {} | {} |\n",
            ratio(values[3], values[1]),
            ratio(values[3], values[2])
        ));
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let header = format!(
        "Measured {} on this machine ({} cores, Linux {}), {} s per run, one run each, same load generator \
         (`wsplice-load`) and echo upstream (`wsplice echo`) for all. Lower is better for latency and memory.\n\n",
        chrono_free_date(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel.trim(),
        scale.seconds
    );
    let results = root.join("benches/results");
    std::fs::create_dir_all(&results)?;
    let markdown = format!("{header}{table}");
    std::fs::write(results.join("latest.md"), &markdown)?;
    let json = serde_json::json!({
        "targets": targets.iter().map(|t| t.name).collect::<Vec<_>>(),
        "rows": rows.iter().map(|(n, v)| serde_json::json!({"metric": n, "values": v})).collect::<Vec<_>>(),
    });
    let mut file = std::fs::File::create(results.join("latest.json"))?;
    writeln!(file, "{json:#}")?;
    println!("\n{markdown}");
    println!("written to benches/results/latest.md and latest.json");
    Ok(())
}

fn chrono_free_date() -> String {
    Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
