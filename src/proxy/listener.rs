//! The accept loop: connection limit, one task (and tracing span) per connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::limits::Slot;
use super::{connection, relay, Proxy};
use crate::error::ClientError;

/// Refuses a client at the door with `err` (counted), without waiting for it.
fn refuse(proxy: &Proxy, tcp: TcpStream, err: ClientError) {
    proxy
        .metrics
        .errors_total
        .with_label_values(&[err.kind().as_str()])
        .inc();
    tokio::spawn(async move {
        let mut tcp = tcp;
        let _ = tcp.write_all(&err.response()).await;
    });
}

/// Runs [`run`] on the first relay thread; the receiver resolves when it has
/// stopped. A connection is then accepted on the thread that serves it whenever
/// that is the first one (always, with a single relay thread): no second thread
/// is woken per new connection, as one would be with accepting on the main runtime.
pub fn start(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let listener = listener.into_std()?;
    let (done, stopped) = tokio::sync::oneshot::channel();
    let relays = proxy.clone();
    relays.relays.spawn_on(
        0,
        Box::pin(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => run(proxy, listener, shutdown).await,
                Err(e) => error!(error = %e, "cannot listen on a relay thread"),
            }
            let _ = done.send(());
        }),
    );
    Ok(stopped)
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
                let Ok(permit) = proxy.limits.connections.clone().try_acquire_owned() else {
                    warn!(%peer, "connection limit reached; refusing client");
                    refuse(&proxy, tcp, ClientError::TooManyConnections);
                    continue;
                };
                let Some(pending) = proxy.limits.unauthenticated.enter(peer.ip()) else {
                    // Not a warning each: this is what a flood from one address looks like.
                    debug!(%peer, "too many unauthenticated connections from this address");
                    refuse(&proxy, tcp, ClientError::TooManyUnauthenticated);
                    continue;
                };
                let slot = Slot::new(permit, &proxy.metrics.connections_open);
                let thread = proxy.relays.next();
                if relay::current() == Some(thread) {
                    // Served on this thread: the socket stays registered with the
                    // event loop it was accepted on (no deregistering and registering
                    // again: two `epoll_ctl` calls per connection).
                    tokio::spawn(connection::serve(proxy.clone(), tcp, peer, slot, pending));
                    continue;
                }
                match tcp.into_std() {
                    // The connection moves to its relay thread for the rest of its life.
                    Ok(tcp) => {
                        let proxy2 = proxy.clone();
                        proxy.relays.spawn_on(
                            thread,
                            Box::pin(async move {
                                match TcpStream::from_std(tcp) {
                                    Ok(tcp) => {
                                        connection::serve(proxy2, tcp, peer, slot, pending).await
                                    }
                                    Err(e) => debug!(%peer, error = %e, "cannot register socket"),
                                }
                            }),
                        );
                    }
                    Err(e) => warn!(%peer, error = %e, "cannot detach accepted socket"),
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
