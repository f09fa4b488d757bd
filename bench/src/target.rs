//! Where the bench sends its traffic: URL templates parsed once, loopback only.
//!
//! The tool opens thousands of connections as fast as it can; pointed at another machine that is
//! a flood, so any address that is not loopback is refused before a single byte is sent.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// An `http://host:port/path` URL whose path may hold `{id}`, resolved to a loopback address.
#[derive(Debug, Clone)]
pub struct UrlTemplate {
    pub addr: SocketAddr,
    /// The `Host` header: the authority as written.
    pub host: String,
    path: String,
}

impl UrlTemplate {
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?}: only http:// URLs are supported"))?;
        let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
        if authority.contains("{id}") {
            return Err(format!("{url:?}: {{id}} belongs in the path, not the host"));
        }
        Ok(Self {
            addr: loopback_addr(authority).map_err(|why| format!("{url:?}: {why}"))?,
            host: authority.to_owned(),
            path: path.to_owned(),
        })
    }

    /// Like [`UrlTemplate::parse`], and the path must contain `{id}`.
    pub fn parse_with_id(url: &str) -> Result<Self, String> {
        let template = Self::parse(url)?;
        if template.path.contains("{id}") {
            Ok(template)
        } else {
            Err(format!("{url:?}: the URL must contain {{id}}"))
        }
    }

    /// The path with `{id}` replaced.
    pub fn path(&self, id: &str) -> String {
        self.path.replace("{id}", id)
    }
}

/// `127.0.0.1:8080`, `[::1]:8080` or `localhost:8080`; anything not loopback is an error.
fn loopback_addr(authority: &str) -> Result<SocketAddr, String> {
    let addr = match authority.strip_prefix("localhost:") {
        Some(port) => SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            port.parse().map_err(|_| format!("bad port {port:?}"))?,
        ),
        None => authority
            .parse()
            .map_err(|_| format!("expected host:port with a literal IP, got {authority:?}"))?,
    };
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(format!(
            "refusing {}: the bench only talks to loopback",
            addr.ip()
        ))
    }
}

/// What is being measured, and how its jobs are created and completed.
#[derive(Debug, Clone)]
pub struct Target {
    /// `Some(token)` for Handoff: jobs are created through `POST /api/jobs` first.
    pub handoff_token: Option<String>,
    pub create: Option<UrlTemplate>,
    pub subscribe: UrlTemplate,
    pub publish: UrlTemplate,
    /// Handoff's progress endpoint.
    pub progress: Option<UrlTemplate>,
    /// Handoff's batch endpoint.
    pub batch: Option<UrlTemplate>,
}

impl Target {
    pub fn handoff(base: &str, token: String) -> Result<Self, String> {
        let base = base.trim_end_matches('/');
        Ok(Self {
            handoff_token: Some(token),
            create: Some(UrlTemplate::parse(&format!("{base}/api/jobs"))?),
            subscribe: UrlTemplate::parse_with_id(&format!("{base}/sse/connect/{{id}}"))?,
            publish: UrlTemplate::parse_with_id(&format!("{base}/api/jobs/{{id}}/complete"))?,
            progress: Some(UrlTemplate::parse_with_id(&format!(
                "{base}/api/jobs/{{id}}/progress"
            ))?),
            batch: Some(UrlTemplate::parse(&format!("{base}/api/jobs/batch"))?),
        })
    }

    /// One target per instance of a fleet: Handoff base URLs, or stream and publish URL pairs.
    pub fn fleet(
        handoff: &[String],
        token: Option<String>,
        sub_urls: &[String],
        pub_urls: &[String],
    ) -> Result<Vec<Self>, String> {
        if !handoff.is_empty() {
            let token = token.ok_or("--handoff needs --token or HANDOFF_API_TOKEN")?;
            return handoff
                .iter()
                .map(|base| Self::handoff(base, token.clone()))
                .collect();
        }
        if sub_urls.is_empty() || sub_urls.len() != pub_urls.len() {
            return Err("give --handoff, or as many --pub-url as --sub-url".into());
        }
        sub_urls
            .iter()
            .zip(pub_urls)
            .map(|(sub, publish)| Self::generic(sub, publish))
            .collect()
    }

    pub fn generic(sub_url: &str, pub_url: &str) -> Result<Self, String> {
        Ok(Self {
            handoff_token: None,
            create: None,
            subscribe: UrlTemplate::parse_with_id(sub_url)?,
            publish: UrlTemplate::parse_with_id(pub_url)?,
            progress: None,
            batch: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_parse_and_fill_in_the_id() {
        let t = UrlTemplate::parse_with_id("http://127.0.0.1:8081/pub?id={id}").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(t.path("abc"), "/pub?id=abc");
        assert!(UrlTemplate::parse("http://localhost:9/x").is_ok());
        assert!(UrlTemplate::parse("http://[::1]:9/x").is_ok());
    }

    #[test]
    fn a_fleet_is_one_target_per_instance_and_pairs_must_match() {
        let bases = [
            "http://127.0.0.1:1".to_owned(),
            "http://127.0.0.1:2".to_owned(),
        ];
        let fleet = Target::fleet(&bases, Some("t".into()), &[], &[]).unwrap();
        assert_eq!(fleet.len(), 2);
        assert_eq!(fleet[1].publish.addr.port(), 2);
        assert!(Target::fleet(&bases, None, &[], &[]).is_err());
        let sub = ["http://127.0.0.1:1/sub/{id}".to_owned()];
        assert!(Target::fleet(&[], None, &sub, &[]).is_err());
        assert_eq!(Target::fleet(&[], None, &sub, &sub).unwrap().len(), 1);
    }

    #[test]
    fn non_loopback_and_malformed_targets_are_refused() {
        for url in [
            "http://10.0.0.1:80/sub/{id}",
            "http://example.com:80/sub/{id}",
            "https://127.0.0.1:80/sub/{id}",
            "http://127.0.0.1/sub/{id}",
            "http://127.0.0.1:80/sub/",
        ] {
            assert!(
                UrlTemplate::parse_with_id(url).is_err(),
                "{url} was accepted"
            );
        }
    }
}
