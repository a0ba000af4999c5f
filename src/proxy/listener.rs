//! The accept loop: connection limit, one task (and tracing span) per connection.

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{connection, Proxy};
use crate::error::ClientError;

/// A client connection's place under `proxy.max_connections`, counted in
/// `offshoot_connections_open` for as long as it is held.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    open: IntGauge,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, open: &IntGauge) -> Self {
        open.inc();
        Self {
            _permit: permit,
            open: open.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Accepts clients until `shutdown`; connections already accepted carry on.
pub async fn run(proxy: Arc<Proxy>, listener: TcpListener, shutdown: CancellationToken) {
    let mut last_warning: Option<std::time::Instant> = None;
    let mut suppressed = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                proxy.metrics.connections_total.inc();
                match proxy.limits.connections.clone().try_acquire_owned() {
                    Ok(permit) => match tcp.into_std() {
                        // The connection moves to a relay thread for the rest of its life.
                        Ok(tcp) => proxy.relays.spawn(Box::pin(connection::serve(
                            proxy.clone(),
                            tcp,
                            peer,
                            Slot::new(permit, &proxy.metrics.connections_open),
                        ))),
                        Err(e) => warn!(%peer, error = %e, "cannot detach accepted socket"),
                    },
                    Err(_) => {
                        let err = ClientError::TooManyConnections;
                        proxy
                            .metrics
                            .errors_total
                            .with_label_values(&[err.kind().as_str()])
                            .inc();
                        warn!(%peer, "connection limit reached; refusing client");
                        tokio::spawn(async move {
                            let mut tcp = tcp;
                            let _ = tcp.write_all(&err.response()).await;
                        });
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning,
                // and say so once a second rather than for every attempt.
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    warn!(error = %e, suppressed, "accept failed");
                    last_warning = Some(std::time::Instant::now());
                    suppressed = 0;
                } else {
                    suppressed += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    info!("listener closed");
}
