//! Which servers each pool has right now: the config file's, unless the admin endpoint set
//! others at run time (`PUT /upstreams/NAME`, the hook service discovery plugs into), with
//! every server given by DNS name expanded to the addresses it last resolved to. Sans-IO: the
//! runtime feeds it resolutions and requests and publishes the configuration it computes
//! ([`Membership::effective`]) as the next generation, as a reload does.
//!
//! A server set at run time stays across reloads while the file's list for that pool stays
//! the same; once the file's list changes, the file is the newer word and wins.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::config::{Config, NamedServer, ServerConfig, UpstreamConfig};

/// The servers set at run time, by pool: what a binary upgrade hands to the successor.
pub type RunTimeServers = BTreeMap<String, Override>;

/// A pool's servers as the admin endpoint set them, with the file's list they replaced.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Override {
    /// The file's servers when they were set (addresses, names).
    file: (Vec<ServerConfig>, Vec<NamedServer>),
    /// The servers set (addresses, names).
    set: (Vec<ServerConfig>, Vec<NamedServer>),
}

/// Why a run-time change is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// No pool of that name in the running configuration.
    #[error("no upstream pool named {0:?}")]
    NoSuchPool(String),
}

/// The run-time part of every pool's servers.
#[derive(Debug, Default)]
pub struct Membership {
    overrides: BTreeMap<String, Override>,
    /// Name → its addresses, as last resolved (absent: never resolved).
    resolved: BTreeMap<String, Vec<IpAddr>>,
}

impl Membership {
    /// `file` with every pool's servers as they run: set at run time or from the file, each
    /// name expanded to its resolved addresses (an address listed twice counts once).
    pub fn effective(&self, file: &Config) -> Config {
        let mut config = file.clone();
        for (name, pool) in &mut config.upstreams {
            let (servers, named) = self.listed(name, pool);
            let (servers, named) = (servers.to_vec(), named.to_vec());
            let mut all = servers;
            for named in &named {
                for &ip in self.resolved.get(&named.host).into_iter().flatten() {
                    let server = named.at(ip);
                    if !all.iter().any(|s| s.addr == server.addr) {
                        all.push(server);
                    }
                }
            }
            pool.servers = all;
            pool.named = named;
        }
        config
    }

    /// The servers `pool` (named `name`) lists now: those set at run time while the file's
    /// list is still the one they replaced, else the file's.
    fn listed<'a>(
        &'a self,
        name: &str,
        pool: &'a UpstreamConfig,
    ) -> (&'a [ServerConfig], &'a [NamedServer]) {
        match self.overrides.get(name) {
            Some(change) if change.file.0 == pool.servers && change.file.1 == pool.named => {
                (&change.set.0, &change.set.1)
            }
            _ => (&pool.servers, &pool.named),
        }
    }

    /// Sets `pool`'s servers (addresses, names) over the file's; returns whether that changes
    /// the effective configuration.
    pub fn set_servers(
        &mut self,
        file: &Config,
        pool: &str,
        servers: (Vec<ServerConfig>, Vec<NamedServer>),
    ) -> Result<bool, MembershipError> {
        let upstream = file
            .upstreams
            .get(pool)
            .ok_or_else(|| MembershipError::NoSuchPool(pool.to_owned()))?;
        let before = self.effective(file);
        self.overrides.insert(
            pool.to_owned(),
            Override {
                file: (upstream.servers.clone(), upstream.named.clone()),
                set: servers,
            },
        );
        Ok(self.effective(file) != before)
    }

    /// The servers set at run time (for a successor).
    pub fn run_time_servers(&self) -> RunTimeServers {
        self.overrides.clone()
    }

    /// Takes the servers a predecessor set at run time, for the pools of `file` whose file
    /// list is still the one they replaced (the file is the newer word otherwise).
    pub fn adopt(&mut self, file: &Config, servers: RunTimeServers) {
        self.overrides = servers;
        for pool in self.reloaded(file) {
            tracing::info!(
                pool,
                "upgrade: the file's servers of this pool changed: they replace those the predecessor set at run time"
            );
        }
    }

    /// A reload read `file`: run-time lists whose pool is gone, or whose file list changed,
    /// are dropped (the file is the newer word). Returns the pools whose list was dropped.
    pub fn reloaded(&mut self, file: &Config) -> Vec<String> {
        let mut dropped = Vec::new();
        self.overrides.retain(|name, change| {
            let kept = file
                .upstreams
                .get(name)
                .is_some_and(|pool| change.file.0 == pool.servers && change.file.1 == pool.named);
            if !kept {
                dropped.push(name.clone());
            }
            kept
        });
        dropped
    }

    /// `host` resolved to `addrs` (sorted); returns whether that is news.
    pub fn resolved(&mut self, host: &str, mut addrs: Vec<IpAddr>) -> bool {
        addrs.sort_unstable();
        addrs.dedup();
        self.resolved.insert(host.to_owned(), addrs.clone()) != Some(addrs)
    }

    /// Every name the running pools use (for the resolver).
    pub fn names(&self, file: &Config) -> Vec<String> {
        let mut names: Vec<String> = file
            .upstreams
            .iter()
            .flat_map(|(name, pool)| self.listed(name, pool).1)
            .map(|named| named.host.clone())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(servers: &str) -> Config {
        let text = format!(
            "[[listener]]\nbind = \"127.0.0.1:8080\"\n\n[[route]]\nupstream = \"app\"\n\n\
             [upstream.app]\nservers = [{servers}]\n"
        );
        Config::parse(&text).expect("test config parses")
    }

    fn addrs(config: &Config) -> Vec<String> {
        config.upstreams["app"]
            .servers
            .iter()
            .map(|s| s.addr.to_string())
            .collect()
    }

    fn server(addr: &str) -> ServerConfig {
        ServerConfig::at(addr.parse().unwrap())
    }

    #[test]
    fn names_expand_to_their_resolved_addresses() {
        let file = config(
            r#""10.0.0.1:80", "app.internal:8080", { addr = "db.internal:9000", weight = 3 }"#,
        );
        let mut membership = Membership::default();
        assert_eq!(
            addrs(&membership.effective(&file)),
            ["10.0.0.1:80"],
            "nothing resolved yet"
        );
        assert_eq!(membership.names(&file), ["app.internal", "db.internal"]);
        assert!(membership.resolved(
            "app.internal",
            vec!["10.0.0.3".parse().unwrap(), "10.0.0.2".parse().unwrap()]
        ));
        assert!(
            !membership.resolved(
                "app.internal",
                vec!["10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap()]
            ),
            "the same set in another order is no news"
        );
        membership.resolved("db.internal", vec!["10.0.0.1".parse().unwrap()]);
        let effective = membership.effective(&file);
        assert_eq!(
            addrs(&effective),
            [
                "10.0.0.1:80",
                "10.0.0.2:8080",
                "10.0.0.3:8080",
                "10.0.0.1:9000"
            ]
        );
        assert_eq!(effective.upstreams["app"].servers[3].weight, 3);
        membership.resolved("app.internal", Vec::new());
        assert_eq!(
            addrs(&membership.effective(&file)),
            ["10.0.0.1:80", "10.0.0.1:9000"]
        );
    }

    #[test]
    fn servers_set_at_run_time_replace_the_files_until_the_file_changes() {
        let file = config(r#""10.0.0.1:80""#);
        let mut membership = Membership::default();
        let set = (
            vec![server("10.0.0.7:80"), server("10.0.0.8:80")],
            Vec::new(),
        );
        assert_eq!(membership.set_servers(&file, "app", set.clone()), Ok(true));
        assert_eq!(
            membership.set_servers(&file, "app", set),
            Ok(false),
            "no news"
        );
        assert_eq!(
            addrs(&membership.effective(&file)),
            ["10.0.0.7:80", "10.0.0.8:80"]
        );
        assert_eq!(
            membership.set_servers(&file, "nope", (Vec::new(), Vec::new())),
            Err(MembershipError::NoSuchPool("nope".into()))
        );
        // A reload of the same file keeps them; a file with another list wins.
        assert!(membership.reloaded(&file).is_empty());
        assert_eq!(
            addrs(&membership.effective(&file)),
            ["10.0.0.7:80", "10.0.0.8:80"]
        );
        let edited = config(r#""10.0.0.1:80", "10.0.0.9:80""#);
        assert_eq!(membership.reloaded(&edited), ["app"]);
        assert_eq!(
            addrs(&membership.effective(&edited)),
            ["10.0.0.1:80", "10.0.0.9:80"]
        );
    }

    #[test]
    fn a_successor_takes_the_servers_set_at_run_time_unless_its_file_changed_them() {
        let file = config(r#""10.0.0.1:80""#);
        let mut old = Membership::default();
        old.set_servers(&file, "app", (vec![server("10.0.0.7:80")], Vec::new()))
            .unwrap();
        let handed = serde_json::to_string(&old.run_time_servers()).unwrap();
        let mut successor = Membership::default();
        successor.adopt(&file, serde_json::from_str(&handed).unwrap());
        assert_eq!(addrs(&successor.effective(&file)), ["10.0.0.7:80"]);
        let edited = config(r#""10.0.0.2:80""#);
        let mut newer = Membership::default();
        newer.adopt(&edited, old.run_time_servers());
        assert_eq!(addrs(&newer.effective(&edited)), ["10.0.0.2:80"]);
    }

    #[test]
    fn names_set_at_run_time_are_resolved_too() {
        let file = config(r#""10.0.0.1:80""#);
        let mut membership = Membership::default();
        let named = NamedServer {
            host: "new.internal".into(),
            port: 81,
            weight: 1,
            max_tunnels: None,
        };
        membership
            .set_servers(&file, "app", (Vec::new(), vec![named]))
            .unwrap();
        assert_eq!(membership.names(&file), ["new.internal"]);
        membership.resolved("new.internal", vec!["10.0.0.5".parse().unwrap()]);
        assert_eq!(addrs(&membership.effective(&file)), ["10.0.0.5:81"]);
    }
}
