//! The configuration file: `config::Config::parse` on TOML text.
//!
//! Properties: any text is a configuration or an error whose line and column point inside the
//! text; an accepted configuration is one the proxy can run on: at least one listener and one
//! route, every route's upstream defined with servers (by address or by name) of sane weights
//! and limits, health checks whose timeout fits their interval, route prefixes in origin form,
//! header rules that cannot break a head (token names, no CR/LF in values), head limits within
//! their bounds; and the routes it builds answer a lookup.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsplice::config::Config;
use wsplice::route::Router;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Err(error) => {
            let lines = text.split('\n').count();
            assert!(error.line <= lines, "{error} past the end ({lines} lines)");
            assert!(!error.message.is_empty());
            if error.line > 0 {
                let line = text.split('\n').nth(error.line - 1).unwrap_or("");
                assert!(
                    error.column <= line.len() + 1,
                    "{error}: column past {line:?}"
                );
            }
        }
        Ok(config) => {
            assert!(!config.listeners.is_empty());
            assert!(!config.routes.is_empty());
            for route in &config.routes {
                let pool = config
                    .upstreams
                    .get(&route.upstream)
                    .unwrap_or_else(|| panic!("route to undefined upstream {:?}", route.upstream));
                // Servers by address, by name (resolved at run time), or both.
                assert!(!pool.servers.is_empty() || !pool.named.is_empty());
                for server in &pool.servers {
                    assert!((1..=256).contains(&server.weight));
                    assert_ne!(server.max_tunnels, Some(0));
                }
                if let Some(check) = &pool.health_check {
                    assert!(check.timeout <= check.interval && check.rise >= 1 && check.fall >= 1);
                }
                if let Some(prefix) = &route.path_prefix {
                    assert!(prefix.starts_with('/'));
                }
                for (name, value) in &route.headers.set {
                    assert!(!name.is_empty() && !name.contains([':', ' ', '\r', '\n']));
                    assert!(!value.contains(['\r', '\n']));
                }
                for name in &route.headers.remove {
                    assert!(!name.is_empty() && !name.contains([':', ' ', '\r', '\n']));
                }
            }
            assert!((8..=1000).contains(&config.limits.max_headers));
            let router = Router::new(&config.routes);
            let _ = router.select("example.test", "/");
        }
    }
});
