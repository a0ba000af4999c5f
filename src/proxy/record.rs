//! The recording relay, used only for sessions on rehearsal branches
//! ([`recorder`]): it relays bytes like [`super::relay`] and, on the way, reads the
//! client's Query, Parse, Bind and Execute messages and the server's
//! CommandComplete, ErrorResponse and ReadyForQuery, so the statements a migration
//! tool sent show up in the rehearsal's report with their timings.
//!
//! Every other session keeps the byte pump: nothing here runs for them.
//!
//! The parser is total: messages are framed by their length, a message longer than
//! [`MAX_MESSAGE`] is passed on without being read, and a frame that cannot be
//! (a length below 4) stops the parsing, never the relay.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Mutex;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::backend::ServerStream;
use super::protocol::Startup;
use super::relay::Counters;
use super::ClientStream;
use crate::names::BranchId;
use crate::recording::{self, Recorded, Recordings};

/// Messages longer than this are relayed without being read.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Where one session's statements go.
pub struct Recorder {
    source: String,
    branch: String,
    session: u64,
    store: &'static Recordings,
}

/// A recorder when the session is on a rehearsal branch and is not one of the
/// rehearsal's own; `None` keeps the plain relay.
pub fn recorder(id: &BranchId, startup: &Startup) -> Option<Recorder> {
    if !recording::records(id.branch.as_str(), startup.get("application_name")) {
        return None;
    }
    let store = Recordings::global();
    let (source, branch) = (id.source.as_str(), id.branch.as_str());
    Some(Recorder {
        session: store.open_session(source, branch),
        source: source.to_owned(),
        branch: branch.to_owned(),
        store,
    })
}

/// Relays the session until either side closes, recording its statements.
pub async fn run(
    client: &mut ClientStream,
    server: ServerStream,
    counters: &Counters,
    recorder: Recorder,
) -> io::Result<()> {
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = tokio::io::split(server);
    let log = Mutex::new(SessionLog::new(recorder));
    let up = async {
        let mut framer = Framer::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = client_read.read(&mut buf).await?;
            if n == 0 {
                let _ = server_write.shutdown().await;
                return Ok(());
            }
            framer.feed(&buf[..n], &mut |ty, body| {
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .client_message(ty, body)
            });
            server_write.write_all(&buf[..n]).await?;
            counters.to_server.inc_by(n as u64);
        }
    };
    let down = async {
        let mut framer = Framer::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = server_read.read(&mut buf).await?;
            if n == 0 {
                let _ = client_write.shutdown().await;
                return Ok(());
            }
            framer.feed(&buf[..n], &mut |ty, body| {
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .server_message(ty, body)
            });
            client_write.write_all(&buf[..n]).await?;
            counters.to_client.inc_by(n as u64);
        }
    };
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

/// Cuts a byte stream into messages (type byte, 4-byte length, body).
#[derive(Default)]
struct Framer {
    buf: Vec<u8>,
    /// Body bytes of an oversized message still to pass.
    skip: usize,
    broken: bool,
}

impl Framer {
    /// Calls `on(type, body)` for each whole message in `data` (body `None` for one
    /// too long to read).
    fn feed(&mut self, mut data: &[u8], on: &mut dyn FnMut(u8, Option<&[u8]>)) {
        while !self.broken {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                if self.skip > 0 {
                    return;
                }
            }
            if self.buf.len() < 5 {
                let n = (5 - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.buf.len() < 5 {
                    return;
                }
            }
            let ty = self.buf[0];
            let len =
                u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
            if len < 4 {
                self.broken = true;
                return;
            }
            let body = len - 4;
            if body > MAX_MESSAGE {
                on(ty, None);
                self.buf.clear();
                self.skip = body;
                continue;
            }
            let n = (body - (self.buf.len() - 5)).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() - 5 < body {
                return;
            }
            on(ty, Some(&self.buf[5..]));
            self.buf.clear();
        }
    }
}

/// Reads a NUL-terminated string at the start of `b`; returns it and the rest.
fn cstr(b: &[u8]) -> Option<(String, &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((
        String::from_utf8_lossy(&b[..end]).into_owned(),
        &b[end + 1..],
    ))
}

fn int16(b: &[u8]) -> Option<(i16, &[u8])> {
    Some((i16::from_be_bytes([*b.first()?, *b.get(1)?]), b.get(2..)?))
}

fn int32(b: &[u8]) -> Option<(i32, &[u8])> {
    let v = i32::from_be_bytes(b.get(..4)?.try_into().ok()?);
    Some((v, b.get(4..)?))
}

/// A Bind message's portal, statement and parameters as text.
fn parse_bind(b: &[u8]) -> Option<(String, String, Vec<Option<String>>)> {
    let (portal, b) = cstr(b)?;
    let (stmt, b) = cstr(b)?;
    let (nfmt, mut b) = int16(b)?;
    let mut formats = Vec::new();
    for _ in 0..nfmt.max(0) {
        let (f, rest) = int16(b)?;
        formats.push(f);
        b = rest;
    }
    let (nparams, mut b) = int16(b)?;
    let mut params = Vec::new();
    for i in 0..nparams.max(0) as usize {
        let (len, rest) = int32(b)?;
        b = rest;
        if len < 0 {
            params.push(None);
            continue;
        }
        let raw = b.get(..len as usize)?;
        b = &b[len as usize..];
        let format = match formats.len() {
            0 => 0,
            1 => formats[0],
            _ => *formats.get(i)?,
        };
        params.push(Some(if format == 0 {
            recording::cut(&String::from_utf8_lossy(raw))
        } else {
            let hex: String = raw
                .iter()
                .take(recording::MAX_TEXT / 2)
                .map(|c| format!("{c:02x}"))
                .collect();
            format!("\\x{hex}")
        }));
    }
    Some((portal, stmt, params))
}

/// An ErrorResponse's SQLSTATE and message.
fn parse_error(mut b: &[u8]) -> (Option<String>, Option<String>) {
    let (mut code, mut message) = (None, None);
    while let Some((&field, rest)) = b.split_first() {
        if field == 0 {
            break;
        }
        let Some((value, rest)) = cstr(rest) else {
            break;
        };
        match field {
            b'C' => code = Some(value),
            b'M' => message = Some(value),
            _ => {}
        }
        b = rest;
    }
    (code, message)
}

/// A statement sent and not yet answered.
struct Open {
    /// From a simple Query (completed by ReadyForQuery) or an Execute (completed by
    /// its CommandComplete).
    simple: bool,
    statement: Recorded,
    started: Instant,
}

/// One session's protocol state: prepared statements, portals, and the
/// statements in flight, oldest first.
struct SessionLog {
    recorder: Recorder,
    prepared: HashMap<String, String>,
    portals: HashMap<String, (String, Vec<Option<String>>)>,
    open: VecDeque<Open>,
}

impl SessionLog {
    fn new(recorder: Recorder) -> Self {
        Self {
            recorder,
            prepared: HashMap::new(),
            portals: HashMap::new(),
            open: VecDeque::new(),
        }
    }

    fn start(&mut self, simple: bool, sql: String, params: Vec<Option<String>>) {
        self.open.push_back(Open {
            simple,
            statement: Recorded {
                session: self.recorder.session,
                sql: recording::cut(&sql),
                params,
                started_unix_ms: recording::unix_ms(),
                duration_ms: 0.0,
                tag: None,
                sqlstate: None,
                message: None,
            },
            started: Instant::now(),
        });
    }

    fn finish(&mut self, mut open: Open) {
        open.statement.duration_ms = open.started.elapsed().as_secs_f64() * 1000.0;
        let r = &self.recorder;
        r.store.push(&r.source, &r.branch, open.statement);
    }

    fn client_message(&mut self, ty: u8, body: Option<&[u8]>) {
        let Some(body) = body else {
            if ty == b'Q' {
                self.start(true, "(a query too long to record)".into(), Vec::new());
            }
            return;
        };
        match ty {
            b'Q' => {
                if let Some((sql, _)) = cstr(body) {
                    self.start(true, sql, Vec::new());
                }
            }
            b'P' => {
                if let Some((name, rest)) = cstr(body) {
                    if let Some((sql, _)) = cstr(rest) {
                        self.prepared.insert(name, sql);
                    }
                }
            }
            b'B' => {
                if let Some((portal, stmt, params)) = parse_bind(body) {
                    let sql = self.prepared.get(&stmt).cloned().unwrap_or_default();
                    self.portals.insert(portal, (sql, params));
                }
            }
            b'E' => {
                if let Some((portal, _)) = cstr(body) {
                    let (sql, params) = self.portals.get(&portal).cloned().unwrap_or_default();
                    self.start(false, sql, params);
                }
            }
            b'C' => {
                // Close: a statement or portal goes away.
                if let (Some(&kind), Some((name, _))) = (body.first(), body.get(1..).and_then(cstr))
                {
                    match kind {
                        b'S' => drop(self.prepared.remove(&name)),
                        _ => drop(self.portals.remove(&name)),
                    }
                }
            }
            _ => {}
        }
    }

    fn server_message(&mut self, ty: u8, body: Option<&[u8]>) {
        let body = body.unwrap_or(&[]);
        match ty {
            b'C' => {
                let tag = cstr(body).map(|(t, _)| t);
                match self.open.front_mut() {
                    Some(o) if o.simple => {
                        let joined = match (o.statement.tag.take(), tag) {
                            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                            (a, b) => a.or(b),
                        };
                        o.statement.tag = joined;
                    }
                    Some(_) => {
                        if let Some(mut o) = self.open.pop_front() {
                            o.statement.tag = tag;
                            self.finish(o);
                        }
                    }
                    None => {}
                }
            }
            b's' | b'I' => {
                if matches!(self.open.front(), Some(o) if !o.simple) {
                    if let Some(o) = self.open.pop_front() {
                        self.finish(o);
                    }
                }
            }
            b'E' => {
                let (code, message) = parse_error(body);
                if let Some(o) = self.open.front_mut() {
                    o.statement.sqlstate = code;
                    o.statement.message = message;
                    if !o.simple {
                        if let Some(o) = self.open.pop_front() {
                            self.finish(o);
                        }
                        // The server skips the rest until Sync.
                        self.open.retain(|o| o.simple);
                    }
                }
            }
            b'Z' => {
                while let Some(o) = self.open.pop_front() {
                    if o.simple {
                        self.finish(o);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![ty];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn frames(data: &[u8], step: usize) -> Vec<(u8, Option<Vec<u8>>)> {
        let mut f = Framer::default();
        let mut out = Vec::new();
        for chunk in data.chunks(step.max(1)) {
            f.feed(chunk, &mut |t, b| out.push((t, b.map(<[u8]>::to_vec))));
        }
        out
    }

    #[test]
    fn framing_survives_any_split_and_any_bytes() {
        let mut data = msg(b'Q', b"SELECT 1\0");
        data.extend(msg(b'S', b""));
        for step in [1, 2, 3, 7, 100] {
            let got = frames(&data, step);
            assert_eq!(
                got,
                vec![(b'Q', Some(b"SELECT 1\0".to_vec())), (b'S', Some(vec![]))]
            );
        }
        // A bad length stops parsing; nothing panics.
        assert!(frames(&[b'Q', 0, 0, 0, 1, 9, 9], 1).is_empty());
        for junk in [
            &[0xffu8; 64][..],
            &[0, 0xff, 0xff, 0xff, 0xff],
            b"Q\0\0\0\x05",
        ] {
            let _ = frames(junk, 3);
        }
        // An oversized message is passed over, and the next one read.
        let mut big = vec![b'd'];
        big.extend(((MAX_MESSAGE + 5) as u32).to_be_bytes());
        big.extend(vec![0u8; MAX_MESSAGE + 1]);
        big.extend(msg(b'S', b""));
        assert_eq!(frames(&big, 4096), vec![(b'd', None), (b'S', Some(vec![]))]);
    }

    #[test]
    fn bind_parameters_and_errors() {
        let mut b = b"p\0s1\0".to_vec();
        b.extend(1i16.to_be_bytes());
        b.extend(0i16.to_be_bytes());
        b.extend(2i16.to_be_bytes());
        b.extend(2i32.to_be_bytes());
        b.extend(b"42");
        b.extend((-1i32).to_be_bytes());
        b.extend(0i16.to_be_bytes());
        let (portal, stmt, params) = parse_bind(&b).unwrap();
        assert_eq!((portal.as_str(), stmt.as_str()), ("p", "s1"));
        assert_eq!(params, vec![Some("42".to_owned()), None]);
        assert!(parse_bind(&b[..9]).is_none());
        let (code, message) = parse_error(b"SERROR\0C23505\0Mduplicate key\0\0");
        assert_eq!(
            (code.as_deref(), message.as_deref()),
            (Some("23505"), Some("duplicate key"))
        );
        let _ = parse_error(b"C");
    }
}
