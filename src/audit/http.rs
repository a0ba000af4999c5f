//! The smallest HTTP/1.1 client the webhooks need: one `POST` per connection
//! (`Connection: close`), the status line read back, nothing else.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A parsed `http://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Url {
    /// As the `Host` header names it (with a port that is not 80).
    pub host_header: String,
    /// What to connect to: `host:port` (`[v6]:port`).
    pub connect: String,
    /// Path and query, at least `/`.
    pub path: String,
}

impl Url {
    /// Parses an `http://` URL; `https://` is refused with a message saying so.
    pub fn parse(url: &str) -> Result<Self, String> {
        if url.starts_with("https://") {
            return Err("https:// is not supported for webhooks; use http:// to a \
                        receiver on a trusted network, or a local TLS-terminating relay"
                .into());
        }
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
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
            None => 80,
            Some(p) => p
                .parse()
                .map_err(|_| format!("{url:?}: {p:?} is not a port"))?,
        };
        let bad = |b: u8| b.is_ascii_whitespace() || b.is_ascii_control();
        if host.is_empty() || host.bytes().any(bad) || path.bytes().any(bad) {
            return Err(format!("{url:?} is not a valid URL"));
        }
        Ok(Self {
            host_header: if port == 80 {
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

/// POSTs `body` with `headers` to `url` and reads the status, all within `timeout`.
pub(super) async fn post(
    url: &Url,
    headers: &[(&str, String)],
    body: &[u8],
    timeout: Duration,
) -> Answer {
    match tokio::time::timeout(timeout, exchange(url, headers, body)).await {
        Ok(Ok(status)) => Answer::Status(status),
        Ok(Err(e)) => Answer::Error(e),
        Err(_) => Answer::Error(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}

async fn exchange(url: &Url, headers: &[(&str, String)], body: &[u8]) -> Result<u16, String> {
    let mut stream = TcpStream::connect(&url.connect)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", url.connect))?;
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
        for bad in [
            "https://example.com/",
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
