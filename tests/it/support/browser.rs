//! Headless Debian Chromium, driven over WebDriver by `/usr/bin/chromedriver`, for end-to-end tests.
//!
//! Each [`Browser`] has its own chromedriver on a free port and its own fresh profile. Nothing is
//! downloaded: a missing Chromium or chromedriver fails the test saying what to install. The
//! browser's console is recorded (`goog:loggingPrefs`), so tests can assert it stayed clean.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::WindowHandle;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::{free_port, stop_process};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const INSTALL: &str = "apt-get install chromium chromium-driver (scripts/test.sh does this)";

/// Two machine cores: at most two browsers at once, however many tests run in parallel.
static SLOTS: Semaphore = Semaphore::const_new(2);

/// How long a test waits for the browser to get somewhere (page loads, reconnects).
pub const PATIENCE: Duration = Duration::from_secs(15);

/// A headless Chromium session. Quit (browser and driver) on drop, even when a test panics.
pub struct Browser {
    pub client: Client,
    driver: Child,
    driver_port: u16,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
    _slot: SemaphorePermit<'static>,
}

impl Browser {
    pub async fn start() -> Browser {
        Self::launch("normal").await
    }

    /// A browser whose navigations return at once instead of waiting for the page to load: for
    /// tabs whose page cannot load yet (the browser's connection limit).
    pub async fn start_without_waiting_for_loads() -> Browser {
        Self::launch("none").await
    }

    async fn launch(page_load_strategy: &str) -> Browser {
        for tool in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(tool).exists(),
                "{tool} is missing: {INSTALL}"
            );
        }
        let slot = SLOTS
            .acquire()
            .await
            .expect("the browser semaphore is never closed");
        let profile = tempfile::tempdir().expect("a profile folder");
        let driver_port = free_port();
        let driver = match Command::new(CHROMEDRIVER)
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(err) if err.kind() == ErrorKind::NotFound => panic!("no chromedriver: {INSTALL}"),
            Err(err) => panic!("cannot start {CHROMEDRIVER}: {err}"),
        };
        let mut connected = None;
        let deadline = Instant::now() + PATIENCE;
        let mut last_error = String::new();
        while Instant::now() < deadline {
            match ClientBuilder::new(HttpConnector::new())
                .capabilities(capabilities(profile.path(), page_load_strategy))
                .connect(&format!("http://127.0.0.1:{driver_port}"))
                .await
            {
                Ok(client) => {
                    connected = Some(client);
                    break;
                }
                Err(err) => last_error = err.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let Some(client) = connected else {
            shutdown_driver(driver_port);
            panic!("chromedriver did not start Chromium: {last_error}\n(install: {INSTALL})");
        };
        let mut browser = Browser {
            client,
            driver,
            driver_port,
            session: String::new(),
            http: super::client_builder().build().expect("client"),
            _profile: profile,
            _slot: slot,
        };
        browser.session = browser
            .client
            .session_id()
            .await
            .expect("session id")
            .expect("a session");
        browser
    }

    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    /// Runs `script` in the page (its `return` value comes back).
    pub async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("running {script:?}: {e}"))
    }

    /// Runs `script` for a string result (`None` for anything else, such as `null`).
    pub async fn js_string(&self, script: &str) -> Option<String> {
        self.js(script).await.as_str().map(str::to_owned)
    }

    pub async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("current URL")
            .to_string()
    }

    /// Polls `check` until it gives a value, for up to [`PATIENCE`]; then panics with `what` and
    /// what `check` last saw.
    async fn wait_for<T>(
        &self,
        what: &str,
        mut check: impl AsyncFnMut() -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match check().await {
                Ok(value) => return value,
                Err(seen) if Instant::now() >= deadline => {
                    panic!("{what} within {PATIENCE:?}: {seen}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Waits up to [`PATIENCE`] for the URL to contain `part`; returns it.
    pub async fn wait_for_url(&self, part: &str) -> String {
        let what = format!("the tab did not reach a URL containing {part:?}");
        self.wait_for(&what, async || {
            let url = self.url().await;
            if url.contains(part) {
                return Ok(url);
            }
            let (state, status) = (self.state().await, self.status_text().await);
            Err(format!(
                "it is at {url} (state {state:?}, status {status:?})"
            ))
        })
        .await
    }

    /// Page A's `data-state` (`connecting`, `connected`, `reconnecting`, `polling`, `done`, `unknown`).
    pub async fn state(&self) -> Option<String> {
        let script = "const el = document.querySelector('[data-handoff-job]'); \
                      return el ? el.getAttribute('data-state') : null;";
        self.js_string(script).await
    }

    /// Page A's status line, as the user reads it.
    pub async fn status_text(&self) -> Option<String> {
        let script = "const el = document.querySelector('[data-handoff-status]'); \
                      return el ? el.innerText : null;";
        self.js_string(script).await
    }

    /// Waits up to [`PATIENCE`] for page A's `data-state` to be `state`.
    pub async fn wait_for_state(&self, state: &str) {
        let what = format!("page A did not reach state {state:?}");
        self.wait_for(&what, async || match self.state().await {
            Some(now) if now == state => Ok(()),
            now => Err(format!("it is {now:?} at {}", self.url().await)),
        })
        .await
    }

    /// The visible text of the whole page (empty while a page is being replaced).
    pub async fn text(&self) -> String {
        let script = "return document.body ? document.body.innerText : '';";
        self.js_string(script).await.unwrap_or_default()
    }

    pub async fn click(&self, css: &str) {
        let element = match self.client.find(Locator::Css(css)).await {
            Ok(element) => element,
            Err(err) => panic!("no {css} on {}: {err}", self.url().await),
        };
        element
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
    }

    /// The job id of the page A the tab is on.
    pub async fn job_id(&self) -> String {
        let url = self.wait_for_url("/jobs/").await;
        url.rsplit('/')
            .next()
            .expect("an id after /jobs/")
            .to_owned()
    }

    /// The protocol the page itself was fetched with (`http/1.1`, `h2`).
    pub async fn protocol(&self) -> String {
        let script = "return performance.getEntriesByType('navigation')[0].nextHopProtocol;";
        self.js_string(script).await.unwrap_or_default()
    }

    /// Opens a new tab, switches to it, returns its handle.
    pub async fn new_tab(&self) -> WindowHandle {
        let tab = self.client.new_window(true).await.expect("a new tab");
        let handle = tab.handle;
        self.switch_to(&handle).await;
        handle
    }

    pub async fn switch_to(&self, tab: &WindowHandle) {
        self.client
            .switch_to_window(tab.clone())
            .await
            .expect("switching tabs");
    }

    /// Console messages of level SEVERE since the last call (the log drains as it is read):
    /// script errors, `console.error`, and failed loads such as `net::ERR_INCOMPLETE_CHUNKED_ENCODING`.
    pub async fn console_errors(&self) -> Vec<String> {
        let log = self
            .driver_command("se/log", json!({ "type": "browser" }))
            .await;
        log.as_array()
            .expect("the browser log is a list")
            .iter()
            .filter(|entry| entry["level"] == "SEVERE")
            .map(|entry| entry["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// A Chrome DevTools Protocol command, through chromedriver.
    pub async fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.driver_command("goog/cdp/execute", json!({ "cmd": cmd, "params": params }))
            .await
    }

    /// From the next page load on, every page starts without `window.EventSource`, as in an old
    /// browser: the script runs before any of the page's own.
    pub async fn remove_event_source_from_new_pages(&self) {
        let source = "delete window.EventSource;";
        self.cdp(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({ "source": source }),
        )
        .await;
    }

    /// From the next page load on, the current tab's pages start without `BroadcastChannel`, so
    /// `handoff.js` cannot share one stream between tabs.
    pub async fn remove_sharing_from_new_pages(&self) {
        let source = "delete window.BroadcastChannel;";
        self.cdp(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({ "source": source }),
        )
        .await;
    }

    /// From the next page load on, the current tab's page A says that a shared stream watches at
    /// most `max` jobs, whatever the server rendered: the attribute changes as the parser adds the
    /// element, before `handoff.js` (deferred) reads it.
    pub async fn limit_watched_jobs_on_new_pages(&self, max: usize) {
        let source = format!(
            "new MutationObserver((_, observer) => {{ \
               const el = document.querySelector('[data-handoff-job]'); \
               if (el) {{ el.setAttribute('data-handoff-max-watched', '{max}'); observer.disconnect(); }} \
             }}).observe(document, {{ childList: true, subtree: true }});"
        );
        self.cdp(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({ "source": source }),
        )
        .await;
    }

    /// Emulates a phone (390 × 844 CSS pixels, mobile viewport), or back to the desktop window.
    pub async fn phone(&self, on: bool) {
        if on {
            let metrics =
                json!({ "width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true });
            self.cdp("Emulation.setDeviceMetricsOverride", metrics)
                .await;
        } else {
            self.cdp("Emulation.clearDeviceMetricsOverride", json!({}))
                .await;
        }
    }

    /// Writes a PNG of the visible page to `target/screenshots/{name}.png`; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("a screenshot");
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/screenshots"));
        std::fs::create_dir_all(&dir).expect("target/screenshots");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("writing the screenshot");
        path
    }

    async fn driver_command(&self, path: &str, body: Value) -> Value {
        let url = format!(
            "http://127.0.0.1:{}/session/{}/{path}",
            self.driver_port, self.session
        );
        let response: Value = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("chromedriver {path}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("chromedriver {path} answer: {e}"));
        assert!(
            response["value"].get("error").is_none(),
            "chromedriver {path} failed: {response}"
        );
        response["value"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver's /shutdown quits Chromium too; killing the driver alone would orphan it.
        shutdown_driver(self.driver_port);
        stop_process(&mut self.driver);
    }
}

fn capabilities(
    profile: &std::path::Path,
    page_load_strategy: &str,
) -> serde_json::Map<String, Value> {
    let args = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        // The TLS tests use a certificate made at test time.
        "--ignore-certificate-errors",
        "--window-size=1280,900",
        // A name that is not localhost: a plain-HTTP origin that is not a secure context.
        "--host-resolver-rules=MAP handoff.test 127.0.0.1",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect::<Vec<_>>();
    let caps = json!({
        "browserName": "chrome",
        "acceptInsecureCerts": true,
        "pageLoadStrategy": page_load_strategy,
        "goog:loggingPrefs": { "browser": "ALL" },
        "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
    });
    match caps {
        Value::Object(map) => map,
        _ => unreachable!("a JSON object literal"),
    }
}

/// Asks chromedriver to quit every session and exit; a plain blocking request, usable in `Drop`.
fn shutdown_driver(port: u16) {
    if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let request = "GET /shutdown HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        if stream.write_all(request.as_bytes()).is_ok() {
            let _ = stream.read_to_end(&mut Vec::new());
        }
    }
}
