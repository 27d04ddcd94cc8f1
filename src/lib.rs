//! orderflow: a high-throughput order-processing stream processor.
//!
//! Layout, lowest layer first. A module uses only modules above it in this
//! list (`tests/layers.rs` checks it), so dependencies point one way and
//! there are no cycles:
//!
//! ```text
//! domain/     orders and validation, PAN detection, statuses, log messages
//!             with deterministic ids, effects, the partitioner, log time as
//!             text. Imports nothing.
//! wall_clock  the one wall clock, for what is not a state transition.
//! telemetry/  Prometheus metrics, the bounded saga-health structures behind
//!             them (orders in flight, top out-of-stock SKUs), and the health
//!             `/readyz` reports. Every layer above records into them.
//! stages/     the pure, deterministic partition processor: validation,
//!             inventory, payment and the multi-SKU saga. State + message →
//!             new state + messages to emit + effects; the state's bounds
//!             (the compact finished set) and its snapshot format (manifest
//!             + blobs). Knows only `domain`.
//! config/     TOML/env/flag configuration with validation, one file per
//!             section or group of sections, the `Secret` type.
//! gateway/    the `PaymentGateway` trait: the simulator (in process, or as
//!             `gateway-sim`), the Stripe client, the circuit breaker.
//! pipeline/   log/ (the `Log` trait; embedded segment log, Kafka), store/
//!             (the `StateStore` trait of bounded snapshots; redb,
//!             ScyllaDB), runner (reads a partition, drives the processor,
//!             appends its output, checkpoints), effects (runs payment
//!             calls outside the state machine and logs their results),
//!             intake (validate, append durably, answer), tokens (derived
//!             tracking tokens), inventory (stock queries and admin), park
//!             lane, membership (static, Kafka consumer groups) and the
//!             supervisor (which partitions run here; restarts), which runs
//!             the `StatusSink`s it is handed (sink.rs).
//! sinks/      consumers of `order-status`, each a `StatusSink`: the bounded
//!             in-memory tracking read model + SSE fan-out (it records the
//!             status metrics), notifications (signed webhooks, batched
//!             email).
//! http/       axum routes, problem+json errors, SSE, the tracking page, the
//!             OpenAPI document built from the routes.
//! app         wires a running instance: picks the backends (embedded or
//!             Kafka + ScyllaDB), starts the sinks, the supervisor, HTTP.
//! sim/        deterministic simulation of the embedded pipeline (`orderflow
//!             sim`): the production processors on a simulated disk (torn
//!             writes, crash points), gateway, clock and scheduler, with
//!             the invariants of docs/design.md checked after every step.
//! bench/      `orderflow bench`: seeded workloads offered open-loop to an
//!             in-process instance, HdrHistogram latency, reports and plots.
//! cli/        clap commands.
//! ```
//!
//! How an order flows: HTTP (or `orderflow produce`) → intake validates and
//! appends the order JSON to `orders`, keyed by its first SKU, and answers
//! 202 once durable → that partition's runner feeds it to the processor,
//! which reserves stock (locally, or by saga messages to other partitions)
//! and asks for a payment authorization effect → the effect executor calls
//! the gateway and appends the result to `orders` → the processor commits
//! or releases stock, asks for capture or void, and emits every status to
//! `order-status` → the tracking sink updates the read model, SSE streams
//! and metrics, and the notifications sink sends webhooks and email.

pub mod app;
pub mod bench;
pub mod cli;
pub mod config;
pub mod domain;
pub mod gateway;
pub mod http;
pub mod pipeline;
pub mod sim;
pub mod sinks;
pub mod stages;
pub mod telemetry;
pub mod wall_clock;
