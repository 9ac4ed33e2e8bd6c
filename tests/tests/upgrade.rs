//! A binary upgrade (`SIGUSR2`, `POST /upgrade` on the admin listener, or `wsplice upgrade`)
//! replaces the running process with a new one of the same binary and command line, and the
//! clients do not notice: every open ws tunnel goes on in the successor, messages in flight
//! arrive, in order, none lost; new connections are accepted throughout; the old process exits
//! 0 holding nothing, and the successor holds exactly what it held (descriptors, eBPF map
//! entries). Each moved tunnel's access lines carry one id: "handed over to the successor" from
//! the old process, its end from the process that closes it. A successor that cannot start
//! changes nothing: the old process logs `upgrade failed` and goes on serving.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::*;

/// Tunnels kept open and echoing through the upgrades.
const TUNNELS: usize = 2000;

/// Upgrades in a row.
const UPGRADES: usize = 3;

/// How often each tunnel sends its next sequenced message.
const PERIOD: Duration = Duration::from_millis(100);

/// The access-line reason of a tunnel the old process handed to its successor.
const HANDED_OVER: &str = "handed over to the successor";

/// Closes the tunnels from the client side and waits for each end (in chunks).
async fn close_all(mut tunnels: Vec<Client>) {
    while !tunnels.is_empty() {
        let chunk: Vec<Client> = tunnels.drain(..CHUNK.min(tunnels.len())).collect();
        futures_util::future::join_all(chunk.into_iter().map(close)).await;
    }
}

/// Closes one tunnel and reads until it ends.
async fn close(mut ws: Client) {
    let _ = bounded(ws.close(None)).await;
    while let Some(Ok(_)) = bounded(ws.next()).await {}
}

/// A new tunnel through the proxy echoes, then closes.
async fn fresh_tunnel_works(proxy: &Proxy, label: &str) {
    let mut ws = connect(&proxy.url(&format!("/{label}"))).await;
    echo_text(&mut ws, label).await;
    close(ws).await;
}

/// Runs [`Proxy::upgrade`] on a blocking thread, so the runtime's threads keep the tunnels'
/// traffic going meanwhile.
async fn upgrade(proxy: Proxy) -> (Proxy, Result<u32, String>) {
    tokio::task::spawn_blocking(move || {
        let mut proxy = proxy;
        let result = proxy.upgrade();
        (proxy, result)
    })
    .await
    .expect("the upgrade thread")
}

/// SIGTERM to the proxy's (current) process: it ends within 10 s, with status 0 when the test
/// can know it (an adopted successor is reaped by the test as its subreaper).
async fn terminate(proxy: Proxy) {
    let (proxy, ended) = tokio::task::spawn_blocking(move || {
        let mut proxy = proxy;
        let ended = proxy.process().terminate_gone(Duration::from_secs(10));
        (proxy, ended)
    })
    .await
    .expect("the terminating thread");
    assert!(
        ended.is_some_and(|status| status.is_none_or(|status| status.success())),
        "{} ended with {ended:?}:\n{}",
        proxy.pid(),
        proxy.log_tail(50)
    );
}

/// Whether `pid` ended: `/proc/PID` is gone (it exited and was reaped), or it is a zombie (it
/// exited; whoever is its parent now has not reaped it yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(Path::new(&format!("/proc/{pid}/stat"))) {
        Err(_) => true,
        // The state follows the command name, which ends with the last ')'.
        Ok(stat) => stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// The eBPF map entries the proxy's process holds (kernel data path only; none otherwise).
fn held_entries(proxy: &Proxy) -> BTreeMap<String, usize> {
    if proxy.datapath == DataPath::Kernel {
        wsplice_tests::bpf::map_entries(proxy.pid())
    } else {
        BTreeMap::new()
    }
}

/// The `"id"` of an access line, which must be a string.
fn id_of(line: &serde_json::Value) -> String {
    line["id"]
        .as_str()
        .unwrap_or_else(|| panic!("an access line without a string \"id\": {line}"))
        .to_owned()
}

/// Whether an access line is the old process's for a tunnel it handed over.
fn handed_over(line: &serde_json::Value) -> bool {
    line["reason"] == HANDED_OVER
}

/// The ids of the access lines of tunnels handed over, in log order.
fn handed_over_ids(proxy: &Proxy) -> Vec<String> {
    proxy
        .access_lines()
        .iter()
        .filter(|line| handed_over(line))
        .map(id_of)
        .collect()
}

/// What the tunnels' echo tasks share with the test.
struct Traffic {
    /// Replies each tunnel got back, in order, so far.
    echoed: Vec<AtomicU64>,
    /// Set to end the traffic: each tunnel then sends an end marker and waits for it.
    stop: AtomicBool,
    /// The first thing that went wrong, if anything.
    failure: Mutex<Option<String>>,
}

impl Traffic {
    /// Nothing echoed yet, for `tunnels` tunnels.
    fn new(tunnels: usize) -> Traffic {
        Traffic {
            echoed: (0..tunnels).map(|_| AtomicU64::new(0)).collect(),
            stop: AtomicBool::new(false),
            failure: Mutex::new(None),
        }
    }

    /// Whether a tunnel failed.
    fn failed(&self) -> bool {
        self.failure.lock().expect("failure lock").is_some()
    }

    /// Records a tunnel's failure (the first one is kept).
    fn fail(&self, error: String) {
        self.failure
            .lock()
            .expect("failure lock")
            .get_or_insert(error);
    }

    /// Fails the test if a tunnel failed.
    fn check(&self, when: &str) {
        if let Some(error) = self.failure.lock().expect("failure lock").as_ref() {
            panic!("{when}: {error}");
        }
    }

    /// Messages echoed so far, over all tunnels.
    fn total(&self) -> u64 {
        self.echoed
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .sum()
    }

    /// Waits until every tunnel got back two more replies than now: the second of them was
    /// sent after this call began (an echo round through whatever happened before it).
    async fn every_tunnel_echoes(&self, when: &str) {
        let marks: Vec<u64> = self
            .echoed
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect();
        let deadline = Instant::now() + WAIT;
        loop {
            self.check(when);
            let behind: Vec<usize> = self
                .echoed
                .iter()
                .zip(&marks)
                .enumerate()
                .filter(|(_, (count, mark))| count.load(Ordering::Relaxed) < *mark + 2)
                .map(|(index, _)| index)
                .collect();
            if behind.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{when}: {} tunnels echoed nothing in {WAIT:?} (the first: {:?})",
                behind.len(),
                &behind[..behind.len().min(10)]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Keeps tunnel `index` echoing: a sequenced message (`index:seq`) every [`PERIOD`], sent
/// whether or not the replies before it came back (so several can be in flight while the
/// process changes), each reply checked to be the next in sequence. When `traffic.stop` is set
/// it sends an end marker and returns the tunnel once the marker came back after every reply.
async fn keep_echoing(index: usize, ws: Client, traffic: Arc<Traffic>) -> Result<Client, String> {
    let (mut sink, mut stream) = ws.split();
    let end = format!("{index}:end");
    let writer = async {
        // Spread over the period, so the tunnels do not all send at once.
        let first = tokio::time::Instant::now() + PERIOD.mul_f64(index as f64 / TUNNELS as f64);
        let mut ticks = tokio::time::interval_at(first, PERIOD);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut seq = 0u64;
        loop {
            ticks.tick().await;
            let stopping = traffic.stop.load(Ordering::Relaxed) || traffic.failed();
            let text = if stopping {
                end.clone()
            } else {
                format!("{index}:{seq}")
            };
            tokio::time::timeout(WAIT, sink.send(Message::text(text)))
                .await
                .map_err(|_| format!("tunnel {index}: message {seq} not sent in {WAIT:?}"))?
                .map_err(|e| format!("tunnel {index}: sending message {seq}: {e}"))?;
            if stopping {
                return Ok(seq);
            }
            seq += 1;
        }
    };
    let reader = async {
        let mut expected = 0u64;
        loop {
            let frame = tokio::time::timeout(WAIT, stream.next())
                .await
                .map_err(|_| format!("tunnel {index}: no reply {expected} in {WAIT:?}: lost"))?;
            let text = match frame {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => {
                    return Err(format!(
                        "tunnel {index}: {other:?} instead of reply {expected}"
                    ))
                }
                Some(Err(e)) => {
                    return Err(format!(
                        "tunnel {index} dropped waiting for reply {expected}: {e}"
                    ))
                }
                None => return Err(format!("tunnel {index} ended waiting for reply {expected}")),
            };
            if text.as_str() == end {
                return Ok(expected);
            }
            if text.as_str() != format!("{index}:{expected}") {
                return Err(format!(
                    "tunnel {index}: {:?} where reply {expected} was due: lost or reordered",
                    text.as_str()
                ));
            }
            expected += 1;
            traffic.echoed[index].store(expected, Ordering::Relaxed);
        }
    };
    let (sent, received) = tokio::try_join!(writer, reader)?;
    if sent != received {
        return Err(format!(
            "tunnel {index}: {sent} sent, {received} echoed: lost"
        ));
    }
    sink.reunite(stream)
        .map_err(|e| format!("tunnel {index}: reunite: {e}"))
}

/// Sockets the proxy process holds.
fn sockets_held(proxy: &Proxy) -> usize {
    proxy
        .fd_targets()
        .iter()
        .filter(|target| target.starts_with("socket:"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_upgrades_keep_every_tunnel() {
    raise_fd_limit(TUNNELS);
    let echo = Echo::start_unrecorded();
    for datapath in datapaths() {
        let mut proxy = Proxy::start(datapath, &ProxyConfig::new(&[echo.addr()]));
        let mut tunnels = open_tunnels(&proxy, &format!("{datapath:?}-open"), TUNNELS).await;
        echo_round(&mut tunnels, 0).await;

        // From now on every tunnel echoes a sequenced message every 100 ms, through the
        // upgrades.
        let traffic = Arc::new(Traffic::new(TUNNELS));
        let tasks: Vec<_> = tunnels
            .into_iter()
            .enumerate()
            .map(|(index, ws)| {
                let traffic = Arc::clone(&traffic);
                tokio::spawn(async move {
                    let result = keep_echoing(index, ws, Arc::clone(&traffic)).await;
                    if let Err(error) = &result {
                        traffic.fail(error.clone());
                    }
                    result
                })
            })
            .collect();
        traffic
            .every_tunnel_echoes(&format!("{datapath:?}: before the upgrades"))
            .await;
        let fds_before = proxy.fd_count();
        let sockets_before = sockets_held(&proxy);
        let entries_before = held_entries(&proxy);
        if datapath == DataPath::Kernel {
            assert_eq!(
                entries_before.get("PEER"),
                Some(&(2 * TUNNELS)),
                "{datapath:?}: every tunnel is spliced before the upgrades: {entries_before:?}"
            );
        }

        let mut ids: Option<BTreeSet<String>> = None;
        let mut handed_before = 0;
        for upgrade_number in 1..=UPGRADES {
            let when = format!("{datapath:?}, upgrade {upgrade_number}");
            let old = proxy.pid();
            let echoed_before = traffic.total();
            // Messages are in flight on every tunnel while the process changes.
            let (upgraded, result) = upgrade(proxy).await;
            proxy = upgraded;
            let new = result.unwrap_or_else(|error| panic!("{when}: {error}"));
            traffic.check(&when);
            assert!(
                traffic.total() > echoed_before,
                "{when}: no traffic during the upgrade"
            );
            assert_ne!(new, old, "{when}: the same PID");
            assert_eq!(proxy.pid(), new, "{when}");
            assert!(
                settles(|| gone(old)).await,
                "{when}: the old process {old} is still there"
            );
            assert_eq!(
                proxy.log().matches("upgrade: handed over").count(),
                upgrade_number,
                "{when}: the old process logs its hand-over:\n{}",
                proxy.log_tail(50)
            );

            // Every tunnel still echoes, through the new process, which counted them in.
            traffic.every_tunnel_echoes(&when).await;
            assert_eq!(
                proxy.metrics()["tunnels_adopted_total"],
                TUNNELS as u64,
                "{when}"
            );
            // New connections are served by it.
            fresh_tunnel_works(&proxy, &format!("{datapath:?}-new-{upgrade_number}")).await;
            // And it holds what the first process held: the same sockets and map entries (and
            // no other descriptor more; the first one also held the program it loaded, which
            // a successor that adopts the maps does not need).
            assert!(
                settles(|| sockets_held(&proxy) == sockets_before
                    && proxy.fd_count() <= fds_before
                    && held_entries(&proxy) == entries_before)
                .await,
                "{when}: the successor holds {} sockets (before: {sockets_before}), {} \
                 descriptors (before: {fds_before}) and map entries {:?} (before: \
                 {entries_before:?}); its other descriptors: {:?}",
                sockets_held(&proxy),
                proxy.fd_count(),
                held_entries(&proxy),
                proxy
                    .fd_targets()
                    .into_iter()
                    .filter(|target| !target.starts_with("socket:"))
                    .collect::<Vec<_>>()
            );

            // The old process logged the hand-over of every tunnel, one line each, the ids
            // distinct and the same at each upgrade.
            let handed = handed_over_ids(&proxy);
            let these = &handed[handed_before..];
            assert_eq!(
                these.len(),
                TUNNELS,
                "{when}: \"{HANDED_OVER}\" access lines"
            );
            let distinct: BTreeSet<String> = these.iter().cloned().collect();
            assert_eq!(distinct.len(), TUNNELS, "{when}: ids repeat: {these:?}");
            match &ids {
                None => ids = Some(distinct),
                Some(first) => assert_eq!(
                    first, &distinct,
                    "{when}: a tunnel's id changed from one process to the next"
                ),
            }
            handed_before = handed.len();
        }

        // The traffic ends: nothing was lost or reordered on any tunnel.
        traffic.stop.store(true, Ordering::Relaxed);
        let mut tunnels = Vec::with_capacity(TUNNELS);
        for task in tasks {
            let ws = bounded(task)
                .await
                .expect("a tunnel's task")
                .unwrap_or_else(|error| panic!("{datapath:?}: {error}"));
            tunnels.push(ws);
        }
        traffic.check(&format!("{datapath:?}: at the end"));
        let total = traffic.total();
        println!("{datapath:?}: {total} messages echoed through {UPGRADES} upgrades");
        close_all(tunnels).await;

        // Each tunnel's end is logged by the last process, with the id it had all along.
        let ids = ids.expect("ids of the handed-over tunnels");
        let ends = |proxy: &Proxy| {
            proxy
                .access_lines()
                .into_iter()
                .filter(|line| !handed_over(line))
                .map(|line| id_of(&line))
                .filter(|id| ids.contains(id))
                .collect::<Vec<_>>()
        };
        assert!(
            settles(|| ends(&proxy).len() >= TUNNELS).await,
            "{datapath:?}: {} of {TUNNELS} tunnels have a final access line",
            ends(&proxy).len()
        );
        let ends = ends(&proxy);
        let distinct: BTreeSet<&String> = ends.iter().collect();
        assert_eq!(
            (ends.len(), distinct.len()),
            (TUNNELS, TUNNELS),
            "{datapath:?}: one final access line per tunnel"
        );
        terminate(proxy).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_fails_to_start_leaves_the_old_process_serving() {
    const OPEN: usize = 50;
    let echo = Echo::start();
    for datapath in datapaths() {
        let config = ProxyConfig::new(&[echo.addr()]);
        let proxy = Proxy::start(datapath, &config);
        let mut tunnels = open_tunnels(&proxy, &format!("{datapath:?}-kept"), OPEN).await;
        echo_round(&mut tunnels, 0).await;
        let pid = proxy.pid();
        let fds_before = proxy.fd_count();
        let entries_before = held_entries(&proxy);

        // The successor reads the config file again: a file that does not load stops it.
        std::fs::write(proxy.config_path(), "[[listener]\nbind = ").expect("break the config");
        let (mut proxy, result) = upgrade(proxy).await;
        let error = result.expect_err("an upgrade whose successor cannot start succeeded");
        assert!(!error.trim().is_empty(), "{datapath:?}: the 500 says why");
        assert!(
            settles(|| proxy.log().contains("upgrade failed")).await,
            "{datapath:?}: {error}\n{}",
            proxy.log_tail(50)
        );

        // The old process goes on: same PID, every tunnel, new connections, nothing leaked.
        assert_eq!(proxy.pid(), pid, "{datapath:?}");
        assert_eq!(proxy.metrics()["upgrade_failures_total"], 1, "{datapath:?}");
        assert!(
            !proxy.log().contains("upgrade: handed over"),
            "{datapath:?}: tunnels left for a successor that never ran:\n{}",
            proxy.log_tail(50)
        );
        assert_eq!(
            proxy.process().wait_gone(Duration::ZERO),
            None,
            "{datapath:?}: the old process ended:\n{}",
            proxy.log_tail(50)
        );
        echo_round(&mut tunnels, 1).await;
        fresh_tunnel_works(&proxy, &format!("{datapath:?}-after-failure")).await;
        assert!(
            settles(|| proxy.fd_count() == fds_before && held_entries(&proxy) == entries_before)
                .await,
            "{datapath:?}: the failed upgrade left {} descriptors (before: {fds_before}), map \
             entries {:?} (before: {entries_before:?}): {:?}",
            proxy.fd_count(),
            held_entries(&proxy),
            proxy.fd_targets()
        );

        // With the file fixed, the next upgrade goes through and takes the tunnels along.
        std::fs::write(proxy.config_path(), proxy.config_text(&config)).expect("restore");
        let (proxy, result) = upgrade(proxy).await;
        let successor = result.unwrap_or_else(|error| panic!("{datapath:?}: {error}"));
        assert_ne!(successor, pid, "{datapath:?}");
        echo_round(&mut tunnels, 2).await;
        close_all(tunnels).await;
        terminate(proxy).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wsplice_upgrade_command_asks_the_running_proxy() {
    let echo = Echo::start();
    let mut proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[echo.addr()]));
    let mut open = connect(&proxy.url("/before-command")).await;
    echo_text(&mut open, "before").await;
    let old = proxy.pid();

    // The old process exits once the tunnel moved: the test must be its successor's reaper by
    // then.
    become_subreaper();
    let file = proxy.config_path().to_owned();
    let stdout = tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new(binary());
        command.args(["upgrade", "-c"]).arg(&file);
        run_bounded(command, "wsplice upgrade")
    })
    .await
    .expect("the command's thread");
    assert!(stdout.contains("upgraded: successor pid"), "{stdout}");
    let pid = successor_pid(&stdout).unwrap_or_else(|| panic!("no PID in {stdout:?}"));
    let (proxy, adopted) = tokio::task::spawn_blocking(move || {
        let adopted = proxy.adopt_successor(pid);
        (proxy, adopted)
    })
    .await
    .expect("the adopting thread");
    assert_eq!(adopted, Ok(pid));
    assert_ne!(pid, old);
    assert_eq!(proxy.pid(), pid);
    assert_took_over(&proxy, old, "wsplice upgrade").await;

    echo_text(&mut open, "after").await;
    fresh_tunnel_works(&proxy, "after-command").await;
    close(open).await;
    terminate(proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrades_like_the_admin_request() {
    const OPEN: usize = 20;
    let echo = Echo::start();
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[echo.addr()]));
    let mut tunnels = open_tunnels(&proxy, "signalled", OPEN).await;
    echo_round(&mut tunnels, 0).await;
    let old = proxy.pid();

    let (proxy, result) = tokio::task::spawn_blocking(move || {
        let mut proxy = proxy;
        let result = proxy.signal_upgrade();
        (proxy, result)
    })
    .await
    .expect("the upgrade thread");
    let pid = result.unwrap_or_else(|error| panic!("{error}"));
    assert_ne!(pid, old);
    assert_took_over(&proxy, old, "SIGUSR2").await;
    echo_round(&mut tunnels, 1).await;
    fresh_tunnel_works(&proxy, "after-signal").await;
    close_all(tunnels).await;
    terminate(proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_tunnels_stay_with_the_old_process_which_says_goodbye_and_the_successor_waits() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    become_subreaper();
    let ca = wsplice_tests::tls::TestCa::new();
    let leaf = ca.issue("localhost", &["localhost"]);
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.tls = Some(wsplice_tests::tls::tls_table(&leaf, ""));
    config.drain = "2s";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let mut wss =
        wsplice_tests::tls::connect_wss(proxy.addr(), "localhost", "/kept", ca.client_config())
            .await;
    wss_echo(&mut wss, "before").await;
    let old = proxy.pid();

    // The successor serves at once; the wss tunnel (its TLS state is the old process's) stays.
    let admin = proxy.admin_addr();
    let (status, body) = tokio::task::spawn_blocking(move || post_upgrade(admin))
        .await
        .expect("the upgrade request");
    assert_eq!(status, 200, "{body}");
    let successor = successor_pid(&body).expect("the successor's pid");
    // The old process stops accepting on the shared admin socket within its poll interval.
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The successor takes no upgrade before it holds everything its predecessor hands over.
    let (status, refused) = tokio::task::spawn_blocking(move || post_upgrade(admin))
        .await
        .expect("the second request");
    assert_eq!(status, 500, "{refused}");
    assert!(refused.contains("still handing"), "{refused}");
    // The wss client, still on the old process, works until its drain ends, then gets the
    // goodbye.
    wss_echo(&mut wss, "during").await;
    let mut closes = Vec::new();
    while let Some(Ok(message)) = tokio::time::timeout(Duration::from_secs(10), wss.next())
        .await
        .expect("the goodbye within 10 s")
    {
        if let Message::Close(frame) = message {
            closes.push(frame.map(|frame| frame.code));
        }
    }
    assert_eq!(closes, vec![Some(CloseCode::Away)]);
    let adopted = tokio::task::spawn_blocking(move || {
        let mut proxy = proxy;
        let adopted = proxy.adopt_successor(successor);
        (proxy, adopted)
    })
    .await
    .expect("adopting");
    let (proxy, adopted) = adopted;
    assert_eq!(adopted, Ok(successor));
    assert_took_over(&proxy, old, "wss kept").await;
    // Its predecessor gone, the successor upgrades again.
    let (proxy, again) = upgrade(proxy).await;
    again.unwrap_or_else(|error| panic!("the next upgrade: {error}"));
    terminate(proxy).await;
}

/// The upgrade is over: the old process `old` is gone and logged its hand-over; `what` names
/// the case in failure messages.
async fn assert_took_over(proxy: &Proxy, old: u32, what: &str) {
    assert!(
        settles(|| gone(old)).await,
        "{what}: the old process {old} is still there"
    );
    assert!(
        proxy.log().contains("upgrade: handed over"),
        "{what}: the old process logs its hand-over:\n{}",
        proxy.log_tail(50)
    );
}

/// One text message over a wss tunnel and its echo.
async fn wss_echo(ws: &mut wsplice_tests::tls::TlsClient, text: &str) {
    bounded(ws.send(Message::text(text))).await.expect("send");
    let back = bounded(ws.next()).await.expect("open").expect("a message");
    assert_eq!(back, Message::text(text));
}
