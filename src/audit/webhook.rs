//! Webhooks: each event a hook subscribes to is POSTed to it as JSON (the same
//! object as its audit line), signed with HMAC-SHA256.
//!
//! Headers of each request:
//! - `X-Offshoot-Event`: the action (`branch.created`);
//! - `X-Offshoot-Delivery`: an id of the event, the same on every retry (so a
//!   receiver can drop a duplicate);
//! - `X-Offshoot-Timestamp`: Unix seconds when this attempt was sent;
//! - `X-Offshoot-Signature: sha256=<hex>`: HMAC-SHA256 with the hook's secret over
//!   `<timestamp>.<body>` (hooks without `secret_file` send none).
//!
//! Each hook has its own bounded queue and task on the control-plane runtime, so a
//! slow or dead receiver holds up only its own deliveries, never a client, the
//! reaper or the audit file. A delivery that fails (no answer, or a status other
//! than 2xx) is retried after 1 s, 2 s, 4 s, ... (at most 60 s apart) until
//! [`GIVE_UP_AFTER`] has passed since the first attempt; 4xx answers other than 408
//! and 429 are not retried. Failures are logged and counted.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::hmac;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::http::{self, Answer, Url};
use super::Event;
use crate::clock::Clock;
use crate::config::WebhookConfig;
use crate::metrics::Metrics;

/// Events waiting for one hook at most; more are dropped (and counted).
const QUEUE: usize = 1024;
/// Retries of one event stop this long after its first attempt.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(300);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// One configured receiver.
struct Hook {
    /// `webhooks[<i>]`, for the log.
    name: String,
    url: Url,
    config: WebhookConfig,
    key: Option<hmac::Key>,
    /// The TLS client of an `https://` hook.
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// The running hooks; [`Webhooks::dispatch`] hands each event to those that want it.
#[derive(Default)]
pub struct Webhooks {
    queues: Vec<(Arc<Hook>, mpsc::Sender<Arc<Event>>)>,
    metrics: Option<Arc<Metrics>>,
}

/// Reads a hook's secret: the file's content without surrounding whitespace. A
/// file other users can read is refused.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o004 != 0 {
        return Err(format!(
            "{shown} is readable by every user (mode {mode:o}); make it private: chmod 600 {shown}"
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let secret = bytes.trim_ascii().to_vec();
    if secret.is_empty() {
        return Err(format!("{shown} is empty"));
    }
    Ok(secret)
}

/// `sha256=<hex>` over `<timestamp>.<body>`.
pub fn signature(key: &hmac::Key, timestamp: u64, body: &[u8]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

impl Webhooks {
    /// Reads every hook's secret and URL and starts its delivery task (on the
    /// current runtime). An error names the hook (`webhooks[1].secret_file: ...`).
    pub fn start(
        configs: &[WebhookConfig],
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let mut queues = Vec::new();
        for (i, config) in configs.iter().enumerate() {
            let name = format!("webhooks[{i}]");
            let url = Url::parse(&config.url).map_err(|e| format!("{name}.url: {e}"))?;
            for (j, pattern) in config.events.iter().enumerate() {
                if !super::Action::is_pattern(pattern) {
                    return Err(format!(
                        "{name}.events[{j}]: {pattern:?} names no event the proxy sends"
                    ));
                }
            }
            let key = match &config.secret_file {
                None => {
                    warn!(hook = %name, "webhook has no secret_file: its requests are not signed");
                    None
                }
                Some(path) => {
                    let secret =
                        read_secret(path).map_err(|e| format!("{name}.secret_file: {e}"))?;
                    Some(hmac::Key::new(hmac::HMAC_SHA256, &secret))
                }
            };
            let tls = match url.tls_name {
                Some(_) => Some(
                    http::tls_config(config.ca_file.as_deref())
                        .map_err(|e| format!("{name}.ca_file: {e}"))?,
                ),
                None => None,
            };
            let hook = Arc::new(Hook {
                name,
                url,
                config: config.clone(),
                key,
                tls,
            });
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(deliver_all(
                hook.clone(),
                rx,
                clock.clone(),
                metrics.clone(),
            ));
            queues.push((hook, tx));
        }
        for outcome in ["ok", "retried", "failed", "dropped"] {
            metrics
                .webhook_deliveries_total
                .with_label_values(&[outcome]);
        }
        Ok(Self {
            queues,
            metrics: Some(metrics),
        })
    }

    /// Queues `event` for every hook that wants it; never waits.
    pub(super) fn dispatch(&self, event: &Event) {
        if self.queues.is_empty() {
            return;
        }
        let event = Arc::new(event.clone());
        for (hook, tx) in &self.queues {
            if !hook.config.wants(event.action.as_str()) {
                continue;
            }
            if tx.try_send(event.clone()).is_err() {
                if let Some(m) = &self.metrics {
                    m.webhook_deliveries_total
                        .with_label_values(&["dropped"])
                        .inc();
                }
                warn!(hook = %hook.name, action = event.action.as_str(), "webhook queue full; event dropped");
            }
        }
    }
}

/// Delivers one hook's events in order until the queue closes.
async fn deliver_all(
    hook: Arc<Hook>,
    mut rx: mpsc::Receiver<Arc<Event>>,
    clock: Clock,
    metrics: Arc<Metrics>,
) {
    while let Some(event) = rx.recv().await {
        deliver(&hook, &event, &clock, &metrics).await;
    }
}

async fn deliver(hook: &Hook, event: &Event, clock: &Clock, metrics: &Metrics) {
    let count = |outcome: &str| {
        metrics
            .webhook_deliveries_total
            .with_label_values(&[outcome])
            .inc()
    };
    let body = match serde_json::to_vec(event) {
        Ok(b) => b,
        Err(e) => return warn!(hook = %hook.name, error = %e, "cannot encode event"),
    };
    let delivery: String = rand::random::<[u8; 12]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let first = Instant::now();
    let mut wait = FIRST_RETRY;
    loop {
        let timestamp = clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut headers = vec![
            ("X-Offshoot-Event", event.action.as_str().to_owned()),
            ("X-Offshoot-Delivery", delivery.clone()),
            ("X-Offshoot-Timestamp", timestamp.to_string()),
        ];
        if let Some(key) = &hook.key {
            headers.push(("X-Offshoot-Signature", signature(key, timestamp, &body)));
        }
        let answer = http::post(
            &hook.url,
            hook.tls.as_ref(),
            &headers,
            &body,
            hook.config.timeout,
        )
        .await;
        let (retry, why) = match answer {
            Answer::Status(s) if (200..300).contains(&s) => {
                count("ok");
                return;
            }
            Answer::Status(s @ (408 | 429)) => (true, format!("answered {s}")),
            Answer::Status(s @ 400..=499) => (false, format!("answered {s}")),
            Answer::Status(s) => (true, format!("answered {s}")),
            Answer::Error(e) => (true, e),
        };
        if !retry || first.elapsed() + wait > GIVE_UP_AFTER {
            count("failed");
            warn!(hook = %hook.name, action = event.action.as_str(), delivery = %delivery, error = %why, "webhook delivery failed; giving up");
            return;
        }
        count("retried");
        info!(hook = %hook.name, action = event.action.as_str(), error = %why, retry_in = %humantime::format_duration(wait), "webhook delivery failed; retrying");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_RETRY);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn signs_timestamp_and_body() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"key");
        // HMAC-SHA256("key", "1700000000.{}"), computed independently.
        let sig = signature(&key, 1_700_000_000, b"{}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64, "{sig}");
        let again = hmac::sign(&key, b"1700000000.{}");
        let hex: String = again.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(sig, format!("sha256={hex}"));
        assert_ne!(sig, signature(&key, 1_700_000_001, b"{}"));
    }

    #[test]
    fn secrets_must_be_private_and_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret(&path).unwrap_err();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&path).unwrap(), b"s3cret");
        std::fs::write(&path, "\n").unwrap();
        assert!(read_secret(&path).unwrap_err().contains("empty"));
        assert!(read_secret(&dir.path().join("missing")).is_err());
    }
}
