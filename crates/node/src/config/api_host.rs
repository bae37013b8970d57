//! What `--api-host` (or `api_host` in `config.toml`) names: an IP address, or a host name that
//! `pod start` resolves once, when it starts.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::str::FromStr;

/// The address the HTTP API binds, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiHost {
    /// An IP address. `localhost` and names under `.localhost` parse to 127.0.0.1 without
    /// asking a resolver.
    Addr(IpAddr),
    /// A host name (checked to be one), resolved by [`ApiHost::resolve`].
    Name(String),
}

/// Why a text is not an [`ApiHost`], or a name cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiHostError {
    /// Neither an IP address nor a host name (a port, a URL, spaces, ...).
    #[error("`{0}` is neither an IP address nor a host name")]
    Malformed(String),
    /// The resolver failed for the name.
    #[error("cannot resolve host name `{name}`: {reason}")]
    Unresolved {
        /// The name.
        name: String,
        /// What the resolver said.
        reason: String,
    },
}

impl FromStr for ApiHost {
    type Err = ApiHostError;

    /// An IP address (IPv6 with or without brackets), or a DNS host name: dot-separated labels
    /// of 1 to 63 letters, digits and hyphens, no label starting or ending with a hyphen, at
    /// most 253 characters, an optional final dot.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let unbracketed = text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or(text);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(ApiHost::Addr(ip));
        }
        let name = text.strip_suffix('.').unwrap_or(text);
        let is_name = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !is_name {
            return Err(ApiHostError::Malformed(text.to_owned()));
        }
        let lower = name.to_ascii_lowercase();
        // RFC 6761: localhost and the names under it are loopback, whatever a resolver says.
        if lower == "localhost" || lower.ends_with(".localhost") {
            return Ok(ApiHost::Addr(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        }
        Ok(ApiHost::Name(text.to_owned()))
    }
}

impl fmt::Display for ApiHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiHost::Addr(ip) => ip.fmt(f),
            ApiHost::Name(name) => f.write_str(name),
        }
    }
}

impl From<IpAddr> for ApiHost {
    fn from(ip: IpAddr) -> Self {
        ApiHost::Addr(ip)
    }
}

impl ApiHost {
    /// The address to bind: the address itself, or the first IPv4 address the system's
    /// resolver gives for the name, else its first address. Blocks while the resolver works.
    pub fn resolve(&self) -> Result<IpAddr, ApiHostError> {
        let name = match self {
            ApiHost::Addr(ip) => return Ok(*ip),
            ApiHost::Name(name) => name,
        };
        let unresolved = |reason: String| ApiHostError::Unresolved {
            name: name.clone(),
            reason,
        };
        let addrs: Vec<IpAddr> = (name.as_str(), 0)
            .to_socket_addrs()
            .map_err(|e| unresolved(e.to_string()))?
            .map(|a| a.ip())
            .collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .ok_or_else(|| unresolved("no address".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    fn parse(text: &str) -> Result<ApiHost, ApiHostError> {
        text.parse()
    }

    #[test]
    fn addresses_and_names_parse_and_the_rest_is_refused() {
        let addr = |ip: IpAddr| Ok(ApiHost::Addr(ip));
        assert_eq!(parse("0.0.0.0"), addr(Ipv4Addr::UNSPECIFIED.into()));
        assert_eq!(parse("::1"), addr(Ipv6Addr::LOCALHOST.into()));
        assert_eq!(parse("[::]"), addr(Ipv6Addr::UNSPECIFIED.into()));
        for name in ["localhost", "LocalHost", "localhost.", "pod.localhost"] {
            assert_eq!(parse(name), addr(Ipv4Addr::LOCALHOST.into()), "{name}");
        }
        for name in ["node1", "node1.example.org", "node1.example.org.", "a-b.c0"] {
            assert_eq!(parse(name), Ok(ApiHost::Name(name.to_owned())));
        }
        let long_label = "a".repeat(64);
        for bad in [
            "",
            ".",
            "0.0.0.0:8080",
            "http://localhost",
            "local host",
            "-pod",
            "pod-",
            "a..b",
            "[::1",
            "host\n",
            long_label.as_str(),
        ] {
            assert_eq!(parse(bad), Err(ApiHostError::Malformed(bad.to_owned())));
        }
        assert_eq!(
            ApiHostError::Malformed("x:1".into()).to_string(),
            "`x:1` is neither an IP address nor a host name"
        );
    }

    #[test]
    fn addresses_resolve_to_themselves_without_a_resolver() {
        for text in ["192.0.2.7", "::", "localhost"] {
            let host = parse(text).unwrap();
            let ApiHost::Addr(ip) = host else {
                panic!("{text} is an address")
            };
            assert_eq!(host.resolve(), Ok(ip));
        }
    }

    #[test]
    fn names_resolve_as_the_system_resolves_them() {
        // `.invalid` never resolves (RFC 6761): the resolver is asked, and says no.
        let err = parse("no-such-host.invalid")
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot resolve host name `no-such-host.invalid`: "),
            "{err}"
        );
        // The machine's own name: the resolver knows it (/etc/hosts, nss-myhostname) or not;
        // either way `resolve` must say what the resolver says, preferring IPv4.
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let name = name.trim();
        let resolved: Vec<IpAddr> = (name, 0)
            .to_socket_addrs()
            .map(|addrs| addrs.map(|a| a.ip()).collect())
            .unwrap_or_default();
        match parse(name).unwrap().resolve() {
            Ok(ip) => {
                assert!(resolved.contains(&ip), "{name}: {ip} not in {resolved:?}");
                assert!(ip.is_ipv4() || resolved.iter().all(IpAddr::is_ipv6));
            }
            Err(e) => assert!(
                resolved.is_empty(),
                "{name}: {e}, yet it resolves to {resolved:?}"
            ),
        }
    }
}
