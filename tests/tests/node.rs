//! Node's `ws`, the most used WebSocket library of Node.js, as a client through wsplice: text
//! and binary messages of every size class echo unchanged, on ws and wss, on every data path.

use std::path::Path;
use std::process::Command;

use wsplice_tests::tls::*;
use wsplice_tests::*;

/// Runs the Node client against `url` (trusting `ca` for wss); what it printed.
fn node_echo(url: &str, ca: Option<&Path>) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("node/echo_client.js");
    let mut command = Command::new("node");
    command
        .arg(script)
        .arg(url)
        .env("NODE_PATH", node_modules());
    if let Some(ca) = ca {
        command.arg(ca);
    }
    run_bounded(command, "node ws client")
}

#[test]
fn node_ws_echoes_every_size_over_ws_and_wss_on_every_data_path() {
    let echo = Echo::start();
    let ca = TestCa::new();
    let leaf = ca.issue("localhost", &["localhost"]);
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[echo.addr()]));
        let said = node_echo(&proxy.url("/node"), None);
        assert_eq!(said.trim(), "ok 14", "{datapath:?}");

        let mut config = ProxyConfig::new(&[echo.addr()]);
        config.tls = Some(tls_table(&leaf, ""));
        let proxy = Proxy::start(datapath, &config);
        let url = format!("wss://localhost:{}/node", proxy.addr().port());
        let said = node_echo(&url, Some(&ca.ca_pem()));
        assert_eq!(said.trim(), "ok 14", "{datapath:?} over wss");
    }
}
