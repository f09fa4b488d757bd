//! The integration tests, one module per area, all in one binary: one compile, one `support`.
//!
//! A test that needs a service (PostgreSQL, Redis) or a tool (nginx, Chromium) either is ignored
//! with the reason (`#[ignore = "needs …"]`) or fails saying what to start or install;
//! scripts/test.sh provides them all and runs with `--include-ignored`.

mod admin;
mod architecture;
mod batch;
mod browser;
mod cli;
mod clients;
mod cluster;
mod core;
mod demo;
mod faults;
mod hostile_input;
mod job_life;
mod limits;
mod logs;
mod monitoring;
mod openapi;
mod packaging;
mod process;
mod properties;
mod proxy;
mod rolling;
mod scale_out;
mod shared_stream;
mod strangers;
mod support;
mod surface;
mod webhooks;
mod wire;
