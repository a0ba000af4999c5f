//! Prometheus metrics. Labels stay bounded: source names come from the configuration,
//! kinds and states from enums; no metric is labelled by branch.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Open client connections relayed to a branch, by source.
    pub client_connections: IntGaugeVec,
    /// Client connections accepted.
    pub connections_total: IntCounter,
    /// Client connections open: in startup or relayed (what `/healthz` reports).
    pub connections_open: IntGauge,
    /// Client connections open that have not finished authenticating.
    pub connections_unauthenticated: IntGauge,
    /// Time to create a branch, by source.
    pub provision_seconds: HistogramVec,
    /// Branches by source and state.
    pub branches: IntGaugeVec,
    /// Branches created, by source.
    pub branches_created_total: IntCounterVec,
    /// Branches removed by the reaper or the API, by source and reason.
    pub branches_expired_total: IntCounterVec,
    /// Errors sent to clients (or that ended a connection), by kind.
    pub errors_total: IntCounterVec,
    /// Bytes relayed, by direction.
    pub bytes_total: IntCounterVec,
    /// Cancel requests, by outcome.
    pub cancel_requests_total: IntCounterVec,
    /// Time to start a suspended branch's server, by source.
    pub start_seconds: HistogramVec,
    /// Branch servers stopped for idleness, by source.
    pub suspensions_total: IntCounterVec,
    /// Clones whose files were copied, by source and mode (reflink or copy).
    pub clones_total: IntCounterVec,
    /// Branches made again under their name (resets and refreshes), by source and
    /// outcome (`ok`, `failed`).
    pub resets_total: IntCounterVec,
    /// Snapshots taken by the schedule, by source and outcome (`ok`, `failed`).
    pub scheduled_snapshots_total: IntCounterVec,
    /// Branches or connections refused by a policy or quota, by source and the key
    /// that refused (`connect_roles`, `create_roles`, `max_branches` of a policy,
    /// `max_branches_per_role`, `source_max_branches`, `max_total_size`).
    pub policy_refusals_total: IntCounterVec,
    /// Server sessions kept for reuse: taken (hit), wanted but none kept (miss),
    /// closed instead of reused (discard).
    pub server_reuse_total: IntCounterVec,
    /// Server sessions kept open for reuse right now.
    pub server_sessions_idle: IntGauge,
    /// Warm spares ready to be claimed, by source (`instance` sources with
    /// `warm_spares`).
    pub spares_ready: IntGaugeVec,
    /// New branches that asked for a warm spare, by source and outcome (`hit`: one
    /// was claimed; `miss`: none was ready, the clone was copied).
    pub spare_claims_total: IntCounterVec,
    /// Audit lines, by outcome (written, dropped: the queue was full, failed: the
    /// write failed).
    pub audit_lines_total: IntCounterVec,
    /// Webhook deliveries, by outcome (ok, retried, failed: gave up, dropped: the
    /// hook's queue was full).
    pub webhook_deliveries_total: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let client_connections = IntGaugeVec::new(
            Opts::new(
                "offshoot_client_connections",
                "Open client connections relayed to a branch",
            ),
            &["source"],
        )
        .expect("valid metric");
        let connections_total = IntCounter::new(
            "offshoot_connections_total",
            "Client connections accepted by the proxy",
        )
        .expect("valid metric");
        let connections_open = IntGauge::new(
            "offshoot_connections_open",
            "Client connections open, in startup or relayed",
        )
        .expect("valid metric");
        let connections_unauthenticated = IntGauge::new(
            "offshoot_connections_unauthenticated",
            "Client connections open that have not finished authenticating",
        )
        .expect("valid metric");
        let provision_seconds = HistogramVec::new(
            HistogramOpts::new(
                "offshoot_provision_seconds",
                "Time taken to create a branch",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ]),
            &["source"],
        )
        .expect("valid metric");
        let branches = IntGaugeVec::new(
            Opts::new("offshoot_branches", "Branches known to the proxy, by state"),
            &["source", "state"],
        )
        .expect("valid metric");
        let branches_created_total = IntCounterVec::new(
            Opts::new("offshoot_branches_created_total", "Branches created"),
            &["source"],
        )
        .expect("valid metric");
        let branches_expired_total = IntCounterVec::new(
            Opts::new(
                "offshoot_branches_expired_total",
                "Branches removed, by reason (idle, api)",
            ),
            &["source", "reason"],
        )
        .expect("valid metric");
        let errors_total = IntCounterVec::new(
            Opts::new(
                "offshoot_errors_total",
                "Errors reported to clients, by kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let bytes_total = IntCounterVec::new(
            Opts::new("offshoot_bytes_total", "Bytes relayed, by direction"),
            &["direction"],
        )
        .expect("valid metric");
        let cancel_requests_total = IntCounterVec::new(
            Opts::new(
                "offshoot_cancel_requests_total",
                "Cancel requests, by outcome",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let start_seconds = HistogramVec::new(
            HistogramOpts::new(
                "offshoot_start_seconds",
                "Time taken to start a suspended branch's server",
            )
            .buckets(vec![
                0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["source"],
        )
        .expect("valid metric");
        let suspensions_total = IntCounterVec::new(
            Opts::new(
                "offshoot_suspensions_total",
                "Branch servers stopped after being idle (scale to zero)",
            ),
            &["source"],
        )
        .expect("valid metric");
        let clones_total = IntCounterVec::new(
            Opts::new(
                "offshoot_clones_total",
                "Clones made by copying files, by mode (reflink: copy-on-write; copy: every byte)",
            ),
            &["source", "mode"],
        )
        .expect("valid metric");
        let resets_total = IntCounterVec::new(
            Opts::new(
                "offshoot_resets_total",
                "Branches made again from a snapshot under the same name (reset or refresh)",
            ),
            &["source", "outcome"],
        )
        .expect("valid metric");
        let scheduled_snapshots_total = IntCounterVec::new(
            Opts::new(
                "offshoot_scheduled_snapshots_total",
                "Snapshots taken by a source's schedule (snapshot_every)",
            ),
            &["source", "outcome"],
        )
        .expect("valid metric");
        let policy_refusals_total = IntCounterVec::new(
            Opts::new(
                "offshoot_policy_refusals_total",
                "Branches or connections refused by a policy or quota, by source and key",
            ),
            &["source", "reason"],
        )
        .expect("valid metric");
        let server_reuse_total = IntCounterVec::new(
            Opts::new(
                "offshoot_server_reuse_total",
                "Server sessions kept for reuse: hit (taken by a client), miss (none kept \
                 for that client), discard (closed instead of reused)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let server_sessions_idle = IntGauge::new(
            "offshoot_server_sessions_idle",
            "Server sessions kept open for reuse",
        )
        .expect("valid metric");
        let spares_ready = IntGaugeVec::new(
            Opts::new(
                "offshoot_spares_ready",
                "Warm spares (clones of the newest snapshot, started) ready to be claimed",
            ),
            &["source"],
        )
        .expect("valid metric");
        let spare_claims_total = IntCounterVec::new(
            Opts::new(
                "offshoot_spare_claims_total",
                "New branches of sources with warm_spares: hit (a spare was claimed), miss \
                 (none was ready; the clone was copied)",
            ),
            &["source", "outcome"],
        )
        .expect("valid metric");
        let audit_lines_total = IntCounterVec::new(
            Opts::new(
                "offshoot_audit_lines_total",
                "Audit trail lines, by outcome (written, dropped, failed)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let webhook_deliveries_total = IntCounterVec::new(
            Opts::new(
                "offshoot_webhook_deliveries_total",
                "Webhook delivery attempts, by outcome (ok, retried, failed, dropped)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for c in [
            Box::new(client_connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(connections_total.clone()),
            Box::new(connections_open.clone()),
            Box::new(connections_unauthenticated.clone()),
            Box::new(provision_seconds.clone()),
            Box::new(branches.clone()),
            Box::new(branches_created_total.clone()),
            Box::new(branches_expired_total.clone()),
            Box::new(errors_total.clone()),
            Box::new(bytes_total.clone()),
            Box::new(cancel_requests_total.clone()),
            Box::new(start_seconds.clone()),
            Box::new(suspensions_total.clone()),
            Box::new(clones_total.clone()),
            Box::new(resets_total.clone()),
            Box::new(scheduled_snapshots_total.clone()),
            Box::new(policy_refusals_total.clone()),
            Box::new(server_reuse_total.clone()),
            Box::new(server_sessions_idle.clone()),
            Box::new(spares_ready.clone()),
            Box::new(spare_claims_total.clone()),
            Box::new(audit_lines_total.clone()),
            Box::new(webhook_deliveries_total.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // Make the series visible from the first scrape.
        for d in ["client_to_server", "server_to_client"] {
            bytes_total.with_label_values(&[d]);
        }
        for o in ["hit", "miss", "discard"] {
            server_reuse_total.with_label_values(&[o]);
        }
        Self {
            registry,
            client_connections,
            connections_total,
            connections_open,
            connections_unauthenticated,
            provision_seconds,
            branches,
            branches_created_total,
            branches_expired_total,
            errors_total,
            bytes_total,
            cancel_requests_total,
            start_seconds,
            suspensions_total,
            clones_total,
            resets_total,
            scheduled_snapshots_total,
            policy_refusals_total,
            server_reuse_total,
            server_sessions_idle,
            spares_ready,
            spare_claims_total,
            audit_lines_total,
            webhook_deliveries_total,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
