//! Handoff: tells a waiting browser, over Server-Sent Events, that its server-side job is done.
//!
//! - [`config`]: settings from the environment.
//! - [`domain`]: job ids, redirect targets, statuses; parsed, never re-checked.
//! - [`store`]: all SQL; the job table is the truth (SQLite or PostgreSQL).
//! - [`hub`]: which streams wait for which job, and how a completion reaches them.
//! - [`fanout`]: Redis Pub/Sub between instances, and the resync that makes a lost message harmless.
//! - [`jobs`]: creating and completing a job (store first, then publish).
//! - [`auth`]: API token, admin session cookie, CSRF.
//! - [`routes`]: the HTTP interface; [`error`]: how failures become responses.
//! - [`limits`]: stream caps, the client's address, the open-file limit.
//! - [`metrics`]: `/metrics`; [`startup`]: wiring, listening and shutting down.

pub mod auth;
pub mod config;
pub mod domain;
pub mod error;
pub mod fanout;
pub mod hub;
pub mod jobs;
pub mod limits;
pub mod metrics;
pub mod routes;
pub mod startup;
pub mod store;
