//! `wsplice import`: an nginx configuration (with a conf.d include, ws and wss servers) turned
//! into a wsplice one by the real binary, which then serves ws, wss and plain HTTP through it.

use std::net::SocketAddr;
use std::process::Command;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::http::HttpConn;
use wsplice_tests::tls::{connect_wss, TestCa};
use wsplice_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_nginx_config_proxies_ws_wss_and_plain_http() {
    let echo = Echo::start();
    let ca = TestCa::new();
    let leaf = ca.issue("import", &["localhost"]);
    let ws: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let wss: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();

    let dir = scratch_dir("import");
    std::fs::create_dir_all(dir.join("conf.d")).unwrap();
    let main = dir.join("nginx.conf");
    std::fs::write(
        &main,
        format!(
            "worker_processes 2;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             \x20   include mime.types;\n\
             \x20   map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n\
             \x20   upstream echo {{ server {}; keepalive 8; }}\n\
             \x20   include conf.d/*.conf;\n\
             }}\n",
            echo.addr()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("conf.d/ws.conf"),
        format!(
            "server {{\n\
             \x20   listen {ws};\n\
             \x20   location / {{\n\
             \x20       proxy_pass http://echo;\n\
             \x20       proxy_http_version 1.1;\n\
             \x20       proxy_set_header Upgrade $http_upgrade;\n\
             \x20       proxy_set_header Connection $connection_upgrade;\n\
             \x20       proxy_set_header Host $host;\n\
             \x20       proxy_read_timeout 1h;\n\
             \x20   }}\n\
             }}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("conf.d/wss.conf"),
        format!(
            "server {{\n\
             \x20   listen {wss} ssl;\n\
             \x20   server_name localhost;\n\
             \x20   ssl_certificate {};\n\
             \x20   ssl_certificate_key {};\n\
             \x20   ssl_protocols TLSv1.2 TLSv1.3;\n\
             \x20   ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256;\n\
             \x20   root /srv/www;\n\
             \x20   location /secure/ {{\n\
             \x20       proxy_pass http://{};\n\
             \x20       proxy_set_header X-Via nginx-import;\n\
             \x20   }}\n\
             }}\n",
            leaf.cert.display(),
            leaf.key.display(),
            echo.addr()
        ),
    )
    .unwrap();

    let output = Command::new(binary())
        .arg("import")
        .arg(&main)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // One warning, naming the included file and the line.
    assert_eq!(
        stderr.trim_end(),
        format!(
            "{}:8: directive `root /srv/www` not imported: wsplice does not serve files: only what a location proxies is imported",
            dir.join("conf.d/wss.conf").display()
        )
    );
    let config = dir.join("wsplice.toml");
    std::fs::write(&config, &output.stdout).unwrap();
    let check = Command::new(binary())
        .arg("check")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&check.stderr),
        String::from_utf8_lossy(&output.stdout)
    );

    let (_proxy, log) = run_config_file(&config, DataPath::Userspace, &[ws, wss]);
    let log = || std::fs::read_to_string(&log).unwrap_or_default();

    // ws:// through the hostless `location /`.
    let mut client = connect(&format!("ws://{ws}/chat")).await;
    echo_text(&mut client, "hello through an imported config").await;

    // wss:// through `server_name localhost; location /secure/`, with its constant header.
    let mut secure = connect_wss(wss, "localhost", "/secure/feed", ca.client_config()).await;
    let message = Message::text("hello over tls");
    bounded(secure.send(message.clone())).await.unwrap();
    let reply = bounded(secure.next())
        .await
        .expect("a reply")
        .expect("a frame");
    assert_eq!(reply, message, "{}", log());
    let recorded = echo.records();
    let feed = recorded
        .iter()
        .find(|r| r.path == "/secure/feed")
        .unwrap_or_else(|| panic!("no /secure/feed handshake: {recorded:?}"));
    assert_eq!(feed.values("X-Via"), ["nginx-import"]);
    assert_eq!(feed.values("X-Forwarded-Proto"), ["https"]);

    // Plain HTTP on the ws listener.
    let mut http = HttpConn::connect(ws).await;
    http.send(b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await;
    let response = http.response(false).await;
    assert_eq!(response.status, 200, "{}", log());
    assert_eq!(response.text().trim_end(), "wsplice echo: GET /hello");
}
