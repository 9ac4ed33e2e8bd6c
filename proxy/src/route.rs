//! Route selection from Host and path, pure: the first route whose host and path prefix match.

use crate::config::RouteConfig;
use crate::target::host_name;

/// Matches requests to routes, in config order.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Matcher>,
}

#[derive(Debug, Clone)]
struct Matcher {
    /// Lowercase host without port; `None` matches any.
    host: Option<String>,
    /// Path prefix; `None` matches any.
    prefix: Option<String>,
}

impl Router {
    /// A router over `routes` (indices returned by [`Router::select`] index this slice).
    pub fn new(routes: &[RouteConfig]) -> Router {
        Router {
            routes: routes
                .iter()
                .map(|route| Matcher {
                    host: route
                        .host
                        .as_deref()
                        .map(|h| host_name(h).to_ascii_lowercase()),
                    prefix: route.path_prefix.clone(),
                })
                .collect(),
        }
    }

    /// Index of the first route matching `host` (a Host header value) and `path` (a request
    /// target); `None` when nothing matches (the proxy answers 404).
    pub fn select(&self, host: &str, path: &str) -> Option<usize> {
        let host = host_name(host);
        self.routes.iter().position(|route| {
            route
                .host
                .as_deref()
                .is_none_or(|wanted| wanted.eq_ignore_ascii_case(host))
                && route
                    .prefix
                    .as_deref()
                    .is_none_or(|prefix| prefix_matches(prefix, path))
        })
    }
}

/// `/chat` matches `/chat`, `/chat/x`, `/chat?x`, not `/chatroom`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let Some(rest) = path.strip_prefix(prefix) else {
        return false;
    };
    prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeaderRulesConfig;

    fn route(host: Option<&str>, prefix: Option<&str>) -> RouteConfig {
        RouteConfig {
            host: host.map(str::to_owned),
            path_prefix: prefix.map(str::to_owned),
            upstream: "u".into(),
            headers: HeaderRulesConfig::default(),
            idle_timeout: None,
            websocket_only: false,
        }
    }

    #[test]
    fn first_match_wins_with_host_and_segment_aware_prefixes() {
        let router = Router::new(&[
            route(Some("Chat.Example"), Some("/chat")),
            route(None, Some("/api/")),
            route(None, None),
        ]);
        assert_eq!(router.select("chat.example:8080", "/chat"), Some(0));
        assert_eq!(router.select("CHAT.example", "/chat/room?x"), Some(0));
        assert_eq!(router.select("chat.example", "/chat?x=1"), Some(0));
        assert_eq!(router.select("chat.example", "/chatroom"), Some(2));
        assert_eq!(router.select("other", "/chat"), Some(2));
        assert_eq!(router.select("other", "/api/v1"), Some(1));
    }

    #[test]
    fn no_match_is_none() {
        let router = Router::new(&[route(Some("a"), None), route(None, Some("/x"))]);
        assert_eq!(router.select("b", "/y"), None);
        assert_eq!(router.select("[::1]:80", "/x/1"), Some(1));
    }
}
