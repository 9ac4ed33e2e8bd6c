//! deploy/kubernetes/wsplice.yaml: valid against the Kubernetes API schemas, its configuration
//! passes `wsplice check`, its probes ask the admin listener that configuration binds, and the
//! capabilities its pod starts the binary with are enough to load the program, bind a port below
//! 1024 and switch to the configured user, holding nothing afterwards.
//!
//! The schemas come with the `kubernetes-validate` package in the tests' Python virtual
//! environment (`cargo xtask test` installs it there, pinned in xtask/src/setup.rs): nothing is
//! downloaded here, and no cluster is needed.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use wsplice_tests::*;

/// Kubernetes versions whose schemas the manifest must pass: the oldest it is meant for and the
/// newest `kubernetes-validate` bundles.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

fn manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/wsplice.yaml")
}

/// `kubernetes-validate --strict` (unknown fields are errors) of `file` against `version`: its
/// verdict and what it said.
fn validate(file: &Path, version: &str) -> (bool, String) {
    let output = Command::new(python())
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
            version,
        ])
        .arg(file)
        .output()
        .expect("python (cargo xtask test creates .tools/python)");
    let said = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        !said.contains("No module named kubernetes_validate"),
        "kubernetes-validate is missing from {} (cargo xtask test installs it): {said}",
        python().display()
    );
    (output.status.success(), said)
}

/// The manifest's documents, read by PyYAML (which kubernetes-validate reads them with too).
fn documents() -> Vec<Value> {
    let mut command = Command::new(python());
    command
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
        ])
        .arg(manifest());
    let json = run_bounded(command, "python with PyYAML (cargo xtask test installs it)");
    serde_json::from_str(&json).expect("the documents as JSON")
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = documents.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} in the manifest");
    found[0]
}

/// The ConfigMap's `wsplice.toml`.
fn configuration(documents: &[Value]) -> String {
    of_kind(documents, "ConfigMap")["data"]["wsplice.toml"]
        .as_str()
        .expect("data.wsplice.toml")
        .to_owned()
}

/// The DaemonSet's one container.
fn container(documents: &[Value]) -> &Value {
    let containers = &of_kind(documents, "DaemonSet")["spec"]["template"]["spec"]["containers"];
    let containers = containers.as_array().expect("containers");
    assert_eq!(containers.len(), 1, "{containers:?}");
    &containers[0]
}

/// A duration of the config (`"30s"`, `"2m"`) in seconds.
fn seconds(text: &str) -> u64 {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).expect("a unit"));
    let number: u64 = number.parse().expect("a number of seconds or minutes");
    match unit {
        "s" => number,
        "m" => number * 60,
        other => panic!("{text}: unit {other:?}: write the drain in s or m"),
    }
}

/// The capabilities of `AmbientCapabilities=` in deploy/systemd/wsplice.service, without `CAP_`.
fn systemd_capabilities() -> BTreeSet<String> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/wsplice.service");
    let text = std::fs::read_to_string(unit).expect("the systemd unit");
    text.lines()
        .find_map(|line| line.strip_prefix("AmbientCapabilities="))
        .expect("AmbientCapabilities= in the unit")
        .split_whitespace()
        .map(|cap| cap.trim_start_matches("CAP_").to_owned())
        .collect()
}

/// The capabilities the pod adds (it drops all others).
fn pod_capabilities(container: &Value) -> BTreeSet<String> {
    let capabilities = &container["securityContext"]["capabilities"];
    assert_eq!(capabilities["drop"], serde_json::json!(["ALL"]));
    capabilities["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|cap| cap.as_str().expect("a name").to_owned())
        .collect()
}

#[test]
fn the_manifest_passes_the_kubernetes_api_schemas() {
    let manifest = manifest();
    for version in KUBERNETES_VERSIONS {
        let (valid, said) = validate(&manifest, version);
        assert!(valid, "Kubernetes {version}: {said}");
        for kind in ["configmap/wsplice", "daemonset/wsplice"] {
            assert!(
                said.contains(&format!("passed for resource {kind}")),
                "Kubernetes {version}: {kind} not checked: {said}"
            );
        }
    }
    // The check is strict: a misspelt field fails it.
    let text = std::fs::read_to_string(&manifest).expect("the manifest");
    let misspelt = text.replacen(
        "terminationGracePeriodSeconds:",
        "terminationGracePeriodSecond:",
        1,
    );
    assert_ne!(misspelt, text);
    let dir = scratch_dir("kubernetes");
    let file = dir.join("misspelt.yaml");
    std::fs::write(&file, misspelt).expect("write");
    let (valid, said) = validate(&file, KUBERNETES_VERSIONS[0]);
    assert!(
        !valid && said.contains("terminationGracePeriodSecond"),
        "{said}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_manifests_configuration_passes_check_and_its_pod_matches_it() {
    let documents = documents();
    let text = configuration(&documents);
    let dir = scratch_dir("kubernetes");
    let file = dir.join("wsplice.toml");
    std::fs::write(&file, &text).expect("write");
    let checked = Command::new(binary())
        .arg("check")
        .arg(&file)
        .output()
        .expect("wsplice check");
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);

    let config: toml::Table = text.parse().expect("TOML");
    let container = container(&documents);
    let pod = &of_kind(&documents, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);

    // `wsplice run -c PATH`, PATH being the ConfigMap's file where its volume is mounted.
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|arg| arg.as_str().expect("an argument"))
        .collect();
    let config_path = match args.as_slice() {
        ["run", "-c", path] => *path,
        other => panic!("the container should run `wsplice run -c FILE`: {other:?}"),
    };
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|mount| {
            format!("{}/wsplice.toml", mount["mountPath"].as_str().unwrap()) == config_path
        })
        .unwrap_or_else(|| panic!("no volume mounted where {config_path} is"));
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|volume| volume["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(
        volume["configMap"]["name"],
        of_kind(&documents, "ConfigMap")["metadata"]["name"]
    );

    // The probes ask the admin listener the configuration binds, where it binds it.
    let admin: SocketAddr = config["admin"]["bind"]
        .as_str()
        .expect("[admin] bind")
        .parse()
        .expect("an address");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], admin.port(), "{probe}");
        assert_eq!(get["host"], admin.ip().to_string(), "{probe}");
    }

    // Every listener's port is declared (with hostNetwork, the node's port).
    let declared: BTreeSet<u64> = container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|port| port["containerPort"].as_u64().expect("containerPort"))
        .collect();
    for listener in config["listener"].as_array().expect("[[listener]]") {
        let bind: SocketAddr = listener["bind"].as_str().unwrap().parse().unwrap();
        assert!(declared.contains(&u64::from(bind.port())), "{bind}");
    }

    // The kubelet waits longer than the grace period and the drain before it kills the pod.
    let timeout = |name: &str, default: u64| {
        config
            .get("timeouts")
            .and_then(|t| t.get(name))
            .map_or(default, |d| seconds(d.as_str().expect("a duration")))
    };
    let (unready, drain) = (timeout("grace", 0), timeout("drain", 30));
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > unready + drain,
        "terminationGracePeriodSeconds {grace} s, timeouts.grace {unready} s + drain {drain} s"
    );

    // The systemd unit's capabilities, and what switching to `user` takes.
    let mut expected = systemd_capabilities();
    expected.extend(["SETUID".to_owned(), "SETGID".to_owned()]);
    assert_eq!(pod_capabilities(container), expected);
    assert_eq!(container["securityContext"]["runAsUser"], 0);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    for key in ["user", "group"] {
        let id = config[key].as_integer().expect("a numeric id");
        assert!(id > 0, "{key} = {id}");
    }
}

/// `CAP_BPF`: kept only on kernels that refuse map commands on open descriptors without it.
const CAP_BPF: u64 = 1 << 39;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pods_capabilities_start_it_and_it_drops_them() {
    if !is_root() {
        println!("skipped: starting as the pod does (uid 0, a reduced set) needs root");
        return;
    }
    let documents = documents();
    let config: toml::Table = configuration(&documents).parse().expect("TOML");
    let (uid, gid) = (
        config["user"].as_integer().expect("user"),
        config["group"].as_integer().expect("group"),
    );
    let caps: Vec<String> = pod_capabilities(container(&documents))
        .iter()
        .map(|cap| format!("+{}", cap.to_lowercase()))
        .collect();
    let caps = caps.join(",");
    let echo = Echo::start();
    let mut proxy_config = ProxyConfig::new(&[echo.addr()]);
    proxy_config.top_level = format!("user = {uid}\ngroup = {gid}\n");
    // As the container runtime starts it: uid 0 with only the pod's capabilities (its bounding
    // set: drop ALL, add those) and no-new-privs (allowPrivilegeEscalation: false).
    proxy_config.wrapper = [
        "setpriv",
        "--inh-caps=-all",
        &format!("--bounding-set=-all,{caps}"),
        "--no-new-privs",
        "--",
    ]
    .map(String::from)
    .to_vec();
    proxy_config.port = Some(free_port_in(600..1000));
    let proxy = Proxy::start(DataPath::Kernel, &proxy_config);
    let log = proxy.log();
    assert!(
        log.contains(&format!("privileges dropped uid={uid} gid={gid}")),
        "{log}"
    );
    let tasks = std::fs::read_dir(format!("/proc/{}/task", proxy.pid())).expect("tasks");
    for task in tasks {
        let status =
            std::fs::read_to_string(task.expect("task").path().join("status")).expect("status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{name}:")))
                .unwrap_or_else(|| panic!("{name} in {status}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(field("Uid"), [uid.to_string().as_str(); 4], "{status}");
        assert_eq!(field("Gid"), [gid.to_string().as_str(); 4], "{status}");
        assert!(field("Groups").is_empty(), "{status}");
        assert_eq!(field("NoNewPrivs"), ["1"], "{status}");
        let set = |name: &str| u64::from_str_radix(field(name)[0], 16).expect("hex");
        assert_eq!(set("CapEff") & !CAP_BPF, 0, "{status}");
        assert_eq!(set("CapPrm"), set("CapEff"), "{status}");
        assert_eq!(set("CapAmb"), 0, "{status}");
    }
    // It loaded the program, bound the port below 1024, and splices as that user.
    let mut ws = connect(&proxy.url("/pod")).await;
    echo_text(&mut ws, "from the pod").await;
    assert!(
        eventually(|| proxy.metrics().get("tunnels_spliced_total") >= Some(&1)),
        "{}",
        proxy.log()
    );
}
