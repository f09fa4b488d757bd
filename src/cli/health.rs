//! `handoff health`: asks a running Handoff's `/healthz` and says so in its exit code, so that a
//! container's `HEALTHCHECK`, a systemd unit and a Kubernetes probe need no shell and no curl.
//!
//! Exit 0 on `200`, 1 on anything else: a container engine reads 1 as "unhealthy" and reserves
//! other codes, so a malformed URL and an unreachable instance are 1 as well.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use url::Url;

use super::HealthArgs;
use super::job::{client, endpoint};

/// Well inside a probe's own timeout: `/healthz` answers from a cache at most a second old.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Where `handoff serve` listens when `HANDOFF_ADDR` is unset.
const DEFAULT_ADDR: &str = "127.0.0.1:8080";

pub fn run(args: HealthArgs) -> ExitCode {
    match check(args) {
        Ok(answer) => {
            print!("{answer}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("handoff: {why}");
            ExitCode::FAILURE
        }
    }
}

fn check(args: HealthArgs) -> Result<String, String> {
    let base = match args.url {
        Some(raw) => Url::parse(&raw)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && url.has_host())
            .ok_or_else(|| format!("--url {raw:?} is not an http:// or https:// URL"))?,
        None => own_address(std::env::var("HANDOFF_ADDR").ok().as_deref())?,
    };
    let url = endpoint(&base, ["healthz"]);
    let (status, body) = get(&url).map_err(|err| format!("cannot reach {url}: {err}"))?;
    if status == 200 {
        Ok(body)
    } else {
        Err(format!("{url} answered {status}: {}", body.trim_end()))
    }
}

/// The instance's own address, from `HANDOFF_ADDR` as `serve` reads it; a wildcard address
/// (`0.0.0.0`, `[::]`) is asked on the loopback of its family.
fn own_address(addr: Option<&str>) -> Result<Url, String> {
    let raw = addr.filter(|a| !a.is_empty()).unwrap_or(DEFAULT_ADDR);
    let mut addr: SocketAddr = raw
        .parse()
        .map_err(|_| format!("HANDOFF_ADDR {raw:?} is not an address and port"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    Url::parse(&format!("http://{addr}/")).map_err(|err| err.to_string())
}

/// One GET with the job commands' HTTP client: the status and the body.
fn get(url: &Url) -> Result<(u16, String), String> {
    let response = client(url, TIMEOUT)?
        .get(url.clone())
        .send()
        .map_err(crate::http_client::describe)?;
    let status = response.status().as_u16();
    let body = response.text().map_err(crate::http_client::describe)?;
    Ok((status, body))
}
