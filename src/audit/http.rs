//! The smallest HTTP/1.1 client the webhooks need: one `POST` per connection
//! (`Connection: close`), over TLS for `https://`, the status line read back,
//! nothing else.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where the system's CA bundle is found on the common distributions, for
/// `https://` hooks without a `ca_file`.
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The TLS client of an `https://` hook: trusting the CAs in `ca_file`, or else
/// the system's bundle.
pub(super) fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let path = match ca_file {
        Some(p) => p.to_owned(),
        None => SYSTEM_BUNDLES
            .iter()
            .map(Path::new)
            .find(|p| p.exists())
            .ok_or("no system CA bundle found; set ca_file to the CA of the receiver")?
            .to_owned(),
    };
    let shown = path.display();
    let pem = std::fs::File::open(&path).map_err(|e| format!("cannot open {shown}: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut BufReader::new(pem)) {
        let cert = cert.map_err(|e| format!("{shown} is not PEM: {e}"))?;
        // A bundle may hold certificates rustls cannot use; the rest still count.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(format!("no usable certificate in {shown}"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS protocol versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Url {
    /// `https://`: the name the server's certificate must show.
    pub tls_name: Option<String>,
    /// As the `Host` header names it (with a port that is not 80).
    pub host_header: String,
    /// What to connect to: `host:port` (`[v6]:port`).
    pub connect: String,
    /// Path and query, at least `/`.
    pub path: String,
}

impl Url {
    /// Parses an `http://` or `https://` URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            _ => return Err(format!("{url:?} is not an http:// or https:// URL")),
        };
        let default_port = if tls { 443 } else { 80 };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("{url:?} has no host (or has credentials in it)"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, _)) if !h.ends_with(']') && h.contains(':') => (authority, None),
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        let port: u16 = match port {
            None => default_port,
            Some(p) => p
                .parse()
                .map_err(|_| format!("{url:?}: {p:?} is not a port"))?,
        };
        let bad = |b: u8| b.is_ascii_whitespace() || b.is_ascii_control();
        if host.is_empty() || host.bytes().any(bad) || path.bytes().any(bad) {
            return Err(format!("{url:?} is not a valid URL"));
        }
        let tls_name = tls.then(|| {
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        });
        if let Some(name) = &tls_name {
            rustls::pki_types::ServerName::try_from(name.as_str())
                .map_err(|_| format!("{url:?}: {name:?} is not a name TLS can check"))?;
        }
        Ok(Self {
            tls_name,
            host_header: if port == default_port {
                host.to_owned()
            } else {
                format!("{host}:{port}")
            },
            connect: format!("{host}:{port}"),
            path,
        })
    }
}

/// What a request got.
#[derive(Debug)]
pub(super) enum Answer {
    Status(u16),
    /// No answer: cannot connect, timed out, or not HTTP.
    Error(String),
}

/// The status line may take this much at most.
const MAX_HEAD: usize = 8192;

/// POSTs `body` with `headers` to `url` and reads the status, all within `timeout`;
/// `tls`: the client of an `https://` URL.
pub(super) async fn post(
    url: &Url,
    tls: Option<&Arc<rustls::ClientConfig>>,
    headers: &[(&str, String)],
    body: &[u8],
    timeout: Duration,
) -> Answer {
    match tokio::time::timeout(timeout, connect(url, tls, headers, body)).await {
        Ok(Ok(status)) => Answer::Status(status),
        Ok(Err(e)) => Answer::Error(e),
        Err(_) => Answer::Error(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}

async fn connect(
    url: &Url,
    tls: Option<&Arc<rustls::ClientConfig>>,
    headers: &[(&str, String)],
    body: &[u8],
) -> Result<u16, String> {
    let tcp = TcpStream::connect(&url.connect)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", url.connect))?;
    match (&url.tls_name, tls) {
        (Some(name), Some(config)) => {
            let name = rustls::pki_types::ServerName::try_from(name.clone())
                .map_err(|_| format!("{name:?} is not a name TLS can check"))?;
            let stream = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {}: {e}", url.connect))?;
            exchange(stream, url, headers, body).await
        }
        (Some(_), None) => Err("no TLS client for an https:// URL".into()),
        (None, _) => exchange(tcp, url, headers, body).await,
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    url: &Url,
    headers: &[(&str, String)],
    body: &[u8],
) -> Result<u16, String> {
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: offshoot/{}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        url.path,
        url.host_header,
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    stream
        .write_all(&request)
        .await
        .map_err(|e| format!("cannot send: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            return status_of(&buf[..end]);
        }
        if buf.len() > MAX_HEAD {
            return Err("the answer's status line is too long".into());
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("cannot read the answer: {e}"))?;
        if n == 0 {
            return Err("the receiver closed the connection without an answer".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `HTTP/1.1 200 OK` → 200.
fn status_of(line: &[u8]) -> Result<u16, String> {
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    match (parts.next(), parts.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(code))) if v.starts_with("HTTP/1.") && (100..600).contains(&code) => {
            Ok(code)
        }
        _ => Err("the answer is not HTTP/1.x".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_urls() {
        let u = Url::parse("http://127.0.0.1:8080/hooks/offshoot?x=1").unwrap();
        assert_eq!(u.connect, "127.0.0.1:8080");
        assert_eq!(u.host_header, "127.0.0.1:8080");
        assert_eq!(u.path, "/hooks/offshoot?x=1");
        let u = Url::parse("http://example.com").unwrap();
        assert_eq!(
            (u.connect.as_str(), u.path.as_str()),
            ("example.com:80", "/")
        );
        assert_eq!(u.host_header, "example.com");
        let u = Url::parse("http://[::1]:9000/h").unwrap();
        assert_eq!(u.connect, "[::1]:9000");
        let u = Url::parse("http://h?q").unwrap();
        assert_eq!(u.path, "/?q");
        let u = Url::parse("https://hooks.example.com/x").unwrap();
        assert_eq!(u.connect, "hooks.example.com:443");
        assert_eq!(u.host_header, "hooks.example.com");
        assert_eq!(u.tls_name.as_deref(), Some("hooks.example.com"));
        assert_eq!(Url::parse("http://h/").unwrap().tls_name, None);
        for bad in [
            "ftp://x/",
            "http:///x",
            "http://u:p@h/",
            "http://h:port/",
            "http://h/a b",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_status_lines() {
        assert_eq!(status_of(b"HTTP/1.1 204 No Content").unwrap(), 204);
        assert_eq!(status_of(b"HTTP/1.0 500").unwrap(), 500);
        assert!(status_of(b"SSH-2.0-OpenSSH").is_err());
        assert!(status_of(b"HTTP/1.1 abc").is_err());
    }
}
