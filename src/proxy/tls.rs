//! TLS towards clients: a rustls server config from PEM files.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use tokio_rustls::TlsAcceptor;

/// The ALPN protocol name PostgreSQL 17 clients offer.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// First byte of a TLS handshake record: a client using direct TLS
/// (`sslnegotiation=direct`) starts with it instead of a length word.
pub const TLS_HANDSHAKE: u8 = 0x16;

/// A loaded certificate: the acceptor, and what SCRAM channel binding binds to.
pub struct Tls {
    pub acceptor: TlsAcceptor,
    /// `tls-server-end-point` data of the leaf certificate; `None` when its
    /// signature algorithm has no hash to use (then SCRAM-SHA-256-PLUS is not offered).
    pub end_point: Option<Arc<[u8]>>,
}

/// Builds the acceptor from a PEM certificate chain and private key.
pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Tls> {
    let certs = rustls_pemfile::certs(&mut BufReader::new(
        File::open(cert).with_context(|| format!("tls.cert: cannot open {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("tls.cert: {} is not PEM", cert.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("tls.cert: no certificate in {}", cert.display()));
    }
    let end_point = crate::auth::scram::tls_server_end_point(certs[0].as_ref()).map(Arc::from);
    let key = rustls_pemfile::private_key(&mut BufReader::new(
        File::open(key).with_context(|| format!("tls.key: cannot open {}", key.display()))?,
    ))
    .with_context(|| format!("tls.key: {} is not PEM", key.display()))?
    .ok_or_else(|| anyhow!("tls.key: no private key in {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("tls.cert and tls.key do not form a usable pair")?;
    let mut config = config;
    // PostgreSQL's ALPN name: required for direct TLS, accepted after SSLRequest. A
    // client that offers ALPN without it is refused by the handshake.
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Tls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        end_point,
    })
}
