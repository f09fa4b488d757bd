//! A real nginx running the repository's own `nginx.conf` in front of test apps.
//!
//! The file is not copied into the tests: its listen ports, its `upstream` server line and its
//! certificate paths are replaced by string substitution, and every other line runs as written.
//! Several upstream instances get one copy each of that server line, only the port changed.
//! If one of those literals changes in `nginx.conf`, `start` fails and says which.
//!
//! One addition: the TLS server also listens for plain HTTP on a port of its own
//! ([`Nginx::plain_url`]). The shipped plain-HTTP server only redirects to HTTPS
//! ([`Nginx::redirect_url`]), but Chromium's HTTP/1.1 tests and reqwest here (built without TLS)
//! need plain HTTP through the very locations and proxy settings browsers reach over TLS.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Handoff, free_port, stop_process};

const CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/nginx.conf");
const LISTEN_HTTP: &str = "listen 80;";
const LISTEN_HTTPS: &str = "listen 443 ssl http2;";
const UPSTREAM_SERVER: &str = "server 127.0.0.1:8080 max_fails=1 fail_timeout=5s;";
/// The address in [`UPSTREAM_SERVER`]: each instance gets a copy of that line with its own port.
const UPSTREAM_ADDRESS: &str = "127.0.0.1:8080";
const CERT: &str = "ssl_certificate /etc/nginx/handoff/cert.pem;";
const KEY: &str = "ssl_certificate_key /etc/nginx/handoff/key.pem;";

/// nginx with the repository's config: the redirecting plain-HTTP server on `redirect_port`, the
/// site over TLS + HTTP/2 on `https_port` (a self-signed certificate for `127.0.0.1` and
/// `localhost`, made at start) and over plain HTTP on `plain_port`. Stopped on drop.
pub struct Nginx {
    pub redirect_port: u16,
    pub plain_port: u16,
    pub https_port: u16,
    child: Child,
    binary: PathBuf,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx proxying to Handoff instances on 127.0.0.1 at `upstream_ports`.
    pub fn start(upstream_ports: &[u16]) -> Nginx {
        assert!(
            !upstream_ports.is_empty(),
            "nginx needs at least one upstream"
        );
        let binary = nginx_binary();
        // Free ports are picked by binding port 0 and letting go; another process may take one
        // in between, so a failed start is retried with fresh ports.
        let mut last_error = String::new();
        for _ in 0..3 {
            match Self::try_start(&binary, upstream_ports) {
                Ok(nginx) => return nginx,
                Err(err) => last_error = err,
            }
        }
        panic!("nginx did not start with {CONF}:\n{last_error}");
    }

    fn try_start(binary: &Path, upstream_ports: &[u16]) -> Result<Nginx, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let ports = Ports {
            redirect: free_port(),
            plain: free_port(),
            https: free_port(),
        };
        write_certificate(dir.path());
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config(dir.path(), &ports, upstream_ports))
            .map_err(|e| e.to_string())?;
        let check = nginx_command(binary, dir.path())
            .args(["-t", "-q"])
            .output()
            .map_err(|e| e.to_string())?;
        if !check.status.success() {
            let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            panic!(
                "nginx -t rejects {CONF} (as substituted in {}):\n{}{log}",
                conf.display(),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let child = nginx_command(binary, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting nginx: {e}"))?;
        let mut nginx = Nginx {
            redirect_port: ports.redirect,
            plain_port: ports.plain,
            https_port: ports.https,
            child,
            binary: binary.to_owned(),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                return Err(format!(
                    "nginx exited with {status}:\n{}",
                    nginx.error_log()
                ));
            }
            if [ports.redirect, ports.plain, ports.https]
                .into_iter()
                .all(listening)
            {
                return Ok(nginx);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nginx is not listening after 10 s:\n{}",
                    nginx.error_log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The site over plain HTTP/1.1 (the test-only port of the TLS server; see the module doc).
    pub fn plain_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.plain_port)
    }

    /// A client of the Handoff instances behind it, over [`plain_url`](Self::plain_url).
    pub fn handoff(&self) -> Handoff {
        Handoff::new(self.plain_url(""))
    }

    /// The shipped plain-HTTP server, which redirects to HTTPS.
    pub fn redirect_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.redirect_port)
    }

    pub fn https_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.https_port)
    }

    /// nginx's error log so far (for failure messages).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // A fast stop (SIGTERM to the master, which ends its workers); killing the master alone
        // would leave the workers holding the ports.
        let _ = nginx_command(&self.binary, self.dir.path())
            .args(["-s", "stop"])
            .output();
        stop_process(&mut self.child);
    }
}

/// nginx with this run's folder (`-p`), config, error log and pid file; in the foreground, so the
/// test owns the master process.
pub fn nginx_command(binary: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(binary);
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-g")
        .arg(format!(
            "pid {}; daemon off;",
            dir.join("nginx.pid").display()
        ));
    cmd
}

struct Ports {
    redirect: u16,
    plain: u16,
    https: u16,
}

/// `nginx.conf` with this run's ports, upstream servers and certificate.
fn config(dir: &Path, ports: &Ports, upstream_ports: &[u16]) -> String {
    let servers = upstream_ports
        .iter()
        .map(|port| UPSTREAM_SERVER.replace(UPSTREAM_ADDRESS, &format!("127.0.0.1:{port}")))
        .collect::<Vec<_>>()
        .join("\n        ");
    let cert = format!("ssl_certificate {};", dir.join("cert.pem").display());
    let key = format!("ssl_certificate_key {};", dir.join("key.pem").display());
    let text = std::fs::read_to_string(CONF).unwrap_or_else(|e| panic!("reading {CONF}: {e}"));
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for (from, to) in [
        (LISTEN_HTTP, format!("listen 127.0.0.1:{};", ports.redirect)),
        (
            LISTEN_HTTPS,
            format!(
                "listen 127.0.0.1:{} ssl http2; listen 127.0.0.1:{};",
                ports.https, ports.plain
            ),
        ),
        (UPSTREAM_SERVER, servers),
        (CERT, cert),
        (KEY, key),
    ] {
        // Whole directive lines only: comments may quote the same text.
        let matching: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].trim() == from)
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "{CONF} must have the line `{from}` exactly once"
        );
        let line = &mut lines[matching[0]];
        *line = line.replace(from, &to);
    }
    lines.join("\n")
}

fn write_certificate(dir: &Path) {
    let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).expect("a self-signed certificate");
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).expect("writing cert.pem");
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem())
        .expect("writing key.pem");
}

/// The nginx binary, or a panic saying how to install it.
pub fn nginx_binary() -> PathBuf {
    for candidate in ["nginx", "/usr/sbin/nginx"] {
        match Command::new(candidate).arg("-v").output() {
            Ok(_) => return PathBuf::from(candidate),
            Err(err) if err.kind() == ErrorKind::NotFound => continue,
            Err(err) => panic!("cannot run {candidate}: {err}"),
        }
    }
    panic!("nginx is not installed: apt-get install nginx (scripts/test.sh does this)");
}

fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}
