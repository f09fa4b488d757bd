//! Handoff: tells a waiting browser, over Server-Sent Events, that its server-side job is done.
//!
//! Layers, each knowing only those below it (ARCHITECTURE.md draws them):
//! - [`cli`]: the command line (serve, the job runner's commands, check-config).
//! - [`startup`]: wiring, listening and shutting down; [`config`]: settings from the environment.
//! - [`routes`]: the HTTP interface (pages, event streams, API, admin, health); translates between
//!   HTTP and the use cases, and maps their errors to answers.
//! - [`jobs`]: the use cases: create, report progress, complete, fail, read, watch one job or
//!   several, list; and the timers (expiry at the deadline, storing progress, purging).
//!   [`sessions`]: admin sessions, live in the store so a logout reaches every instance.
//! - [`delivery`]: how a stored ending reaches every waiting stream, here ([`hub`]) and on other
//!   instances ([`fanout`], the Redis link), with the catch-up that makes a lost message harmless.
//! - [`webhooks`]: with `HANDOFF_WEBHOOK_URL`, tells the deployment's backend whether a stream
//!   took each ending (`delivered`) or none did (`unclaimed`), signed, from the store's outbox.
//! - [`store`]: all SQL; the job table is the truth (SQLite or PostgreSQL).
//! - [`domain`]: job ids, redirect targets, statuses, endings; parsed, never re-checked.
//! - Beside them: [`auth`] (API token, admin session, CSRF), [`limits`] (stream caps, client
//!   address, token-guess throttle, demo jobs per address, open-file limit), [`metrics`]
//!   (`/metrics`), [`http_client`] (the one outgoing HTTP client: webhooks, job commands),
//!   [`logging`] (the log's text or JSON lines).

pub mod auth;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod fanout;
pub mod http_client;
pub mod hub;
pub mod jobs;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod routes;
pub mod sessions;
pub mod startup;
pub mod store;
pub mod webhooks;
