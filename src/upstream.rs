//! TLS towards PostgreSQL servers: the proxy's sessions to branch servers, and the
//! control plane's own sessions to source servers (administration, `auth.query`,
//! cancels). A leaf: both the data path (`proxy`) and the engines (`branch`) use it,
//! so neither has to import the other.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};

/// How the proxy's own connections to a source's server use TLS.
#[derive(Clone)]
pub struct Upstream {
    /// `None`: plain connections (`server_tls = "disable"`).
    pub config: Option<Arc<rustls::ClientConfig>>,
}

impl Upstream {
    /// Builds the client side for `server_tls` (`disable`, `require`, `verify-full`)
    /// with `ca` (PEM) as the only trusted root for `verify-full`.
    pub fn new(mode: crate::config::ServerTls, ca: Option<&Path>) -> anyhow::Result<Self> {
        use crate::config::ServerTls;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let config = match mode {
            ServerTls::Disable => return Ok(Self { config: None }),
            // Encryption without authentication, as libpq's sslmode=require.
            ServerTls::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
                .with_no_client_auth(),
            ServerTls::VerifyFull => {
                let ca =
                    ca.ok_or_else(|| anyhow!("server_tls = \"verify-full\" needs server_ca"))?;
                let mut roots = rustls::RootCertStore::empty();
                let pem = File::open(ca)
                    .with_context(|| format!("server_ca: cannot open {}", ca.display()))?;
                for cert in rustls_pemfile::certs(&mut BufReader::new(pem)) {
                    let cert =
                        cert.with_context(|| format!("server_ca: {} is not PEM", ca.display()))?;
                    roots.add(cert).with_context(|| {
                        format!("server_ca: bad certificate in {}", ca.display())
                    })?;
                }
                if roots.is_empty() {
                    return Err(anyhow!("server_ca: no certificate in {}", ca.display()));
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        Ok(Self {
            config: Some(Arc::new(config)),
        })
    }

    /// Opens a tokio-postgres session (administration, `auth.query`) with this
    /// setting, and spawns its connection task; `what` names it in the log.
    pub async fn pg_connect(
        &self,
        config: &tokio_postgres::Config,
        what: &'static str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        fn spawn<F>(conn: F, what: &'static str)
        where
            F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
        {
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "{what} connection closed");
                }
            });
        }
        // Plain sessions must not go through the TLS connector at all: it rejects
        // Unix socket paths as server names before sslmode is even looked at.
        match &self.config {
            None => {
                let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
                spawn(conn, what);
                Ok(client)
            }
            Some(tls) => {
                let make = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                let (client, conn) = config.connect(make).await?;
                spawn(conn, what);
                Ok(client)
            }
        }
    }

    /// Sets a tokio-postgres config's sslmode to match.
    pub fn apply(&self, config: &mut tokio_postgres::Config) {
        config.ssl_mode(match self.config {
            Some(_) => tokio_postgres::config::SslMode::Require,
            None => tokio_postgres::config::SslMode::Disable,
        });
    }
}

/// Accepts any server certificate (`server_tls = "require"`); the handshake
/// signature is still checked, so the session is encrypted to whoever answered.
/// Also what tests use as a client that checks the protocol, not the PKI.
#[derive(Debug)]
pub struct NoVerification(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Opens TLS on a fresh connection to a PostgreSQL server: SSLRequest, `S`, handshake.
pub async fn connect_server(
    config: Arc<rustls::ClientConfig>,
    host: &str,
    mut tcp: tokio::net::TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        return Err(std::io::Error::other(
            "the server does not accept TLS (server_tls is set)",
        ));
    }
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| std::io::Error::other(format!("bad server name {host:?}: {e}")))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}
