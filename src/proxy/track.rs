//! Where a relayed session stands, followed from message headers alone, so the
//! relay can tell a client that ends cleanly (and whose server session may be
//! kept for reuse) from one that leaves anything behind.
//!
//! Only the five-byte headers (and ReadyForQuery's status byte) are looked at;
//! bodies are skipped by length, so the cost is a few comparisons per message on
//! top of the byte pump. Both directions are followed: the server's for
//! ReadyForQuery and its transaction status, the client's for requests still
//! unanswered and for its Terminate, which the relay must hold back when the
//! session is to be kept.
//!
//! Every doubt counts against reuse: a request the server never answered, an
//! extended-protocol message with no Sync after it, a header split across reads,
//! or a status other than idle all leave the session to be closed as before.

/// Follows message boundaries in one direction.
#[derive(Default)]
struct Frames {
    /// Body bytes of the current message still to come.
    left: usize,
    /// Whether the next body byte is the first of its message.
    first: bool,
    /// The current message's type.
    kind: u8,
    head: [u8; 5],
    /// Header bytes collected so far (a header can span two reads).
    have: usize,
}

/// What [`Frames::walk`] reports.
enum Seen {
    /// A whole header: the message type, and where its type byte is in the data
    /// walked (`None` when the header began in an earlier read).
    Header { kind: u8, at: Option<usize> },
    /// The first body byte of a message of type `kind`.
    First { kind: u8, byte: u8 },
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.left == 0 && self.have == 0
    }

    /// Walks `data` and reports headers and first body bytes to `on`, which
    /// returns false to stop; returns the offset where it stopped.
    fn walk(&mut self, data: &[u8], mut on: impl FnMut(Seen) -> bool) -> Option<usize> {
        let mut i = 0;
        while i < data.len() {
            if self.left > 0 {
                if self.first {
                    self.first = false;
                    on(Seen::First {
                        kind: self.kind,
                        byte: data[i],
                    });
                }
                let n = self.left.min(data.len() - i);
                self.left -= n;
                i += n;
                continue;
            }
            let start = (self.have == 0).then_some(i);
            let n = (5 - self.have).min(data.len() - i);
            self.head[self.have..self.have + n].copy_from_slice(&data[i..i + n]);
            self.have += n;
            i += n;
            if self.have < 5 {
                break;
            }
            self.have = 0;
            self.kind = self.head[0];
            let len = u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
            self.left = (len as usize).saturating_sub(4);
            self.first = self.left > 0;
            if !on(Seen::Header {
                kind: self.kind,
                at: start,
            }) {
                return start;
            }
        }
        None
    }
}

/// The state of one relayed session, as far as reuse is concerned.
pub struct Tracker {
    up: Frames,
    down: Frames,
    /// Queries, Syncs and function calls sent and not yet answered by ReadyForQuery.
    awaiting: u32,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// The status byte of the last ReadyForQuery (`I` idle, `T` in a transaction,
    /// `E` in a failed one).
    status: u8,
    /// The client's Terminate was held back: the session ended cleanly.
    terminated: bool,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

impl Tracker {
    /// A session just opened: the server has sent ReadyForQuery, idle.
    pub fn new() -> Self {
        Self {
            up: Frames::default(),
            down: Frames::default(),
            awaiting: 0,
            unsynced: false,
            status: b'I',
            terminated: false,
        }
    }

    /// Bytes read from the client: returns how many of them to pass on. Fewer than
    /// all means the client sent Terminate on a settled session; it and what
    /// follows are held back, and the session is [`Tracker::terminated`].
    pub fn client(&mut self, data: &[u8]) -> usize {
        // Server bytes do not move while client bytes are walked.
        let server_idle = self.status == b'I' && self.down.at_boundary();
        let Self {
            up,
            awaiting,
            unsynced,
            ..
        } = self;
        let stop = up.walk(data, |seen| {
            if let Seen::Header { kind, at } = seen {
                match kind {
                    b'Q' | b'S' | b'F' => {
                        *awaiting += 1;
                        *unsynced = false;
                    }
                    // Flush, and COPY data whose end the server answers.
                    b'H' | b'd' | b'c' | b'f' => {}
                    b'X' if at.is_some() && server_idle && *awaiting == 0 && !*unsynced => {
                        return false;
                    }
                    _ => *unsynced = true,
                }
            }
            true
        });
        match stop {
            Some(at) => {
                self.terminated = true;
                at
            }
            None => data.len(),
        }
    }

    /// Bytes read from the server (all of them are passed on).
    pub fn server(&mut self, data: &[u8]) {
        let Self {
            down,
            awaiting,
            status,
            ..
        } = self;
        down.walk(data, |seen| {
            if let Seen::First { kind: b'Z', byte } = seen {
                *awaiting = awaiting.saturating_sub(1);
                *status = byte;
            }
            true
        });
    }

    /// Whether the client's Terminate was held back on a settled session.
    pub fn terminated(&self) -> bool {
        self.terminated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    const TERMINATE: &[u8] = b"X\0\0\0\x04";

    fn answer(t: &mut Tracker, status: u8) {
        let mut reply = msg(b'C', b"SELECT 1\0");
        reply.extend(msg(b'Z', &[status]));
        t.server(&reply);
    }

    #[test]
    fn terminate_after_an_answered_query_is_held_back() {
        let mut t = Tracker::new();
        let q = msg(b'Q', b"select 1\0");
        assert_eq!(t.client(&q), q.len());
        answer(&mut t, b'I');
        assert_eq!(t.client(TERMINATE), 0);
        assert!(t.terminated());
    }

    #[test]
    fn a_transaction_left_open_is_not_clean() {
        let mut t = Tracker::new();
        t.client(&msg(b'Q', b"begin\0"));
        answer(&mut t, b'T');
        assert_eq!(t.client(TERMINATE), TERMINATE.len());
        assert!(!t.terminated());
    }

    #[test]
    fn a_request_in_flight_is_not_clean() {
        let mut t = Tracker::new();
        let mut both = msg(b'Q', b"select pg_sleep(1)\0");
        both.extend_from_slice(TERMINATE);
        assert_eq!(t.client(&both), both.len(), "pipelined Terminate passes");
        assert!(!t.terminated());
    }

    #[test]
    fn extended_messages_without_sync_are_not_clean() {
        let mut t = Tracker::new();
        t.client(&msg(b'P', b"\0select 1\0\0\0"));
        assert_eq!(t.client(TERMINATE), TERMINATE.len());
        let mut t = Tracker::new();
        let mut batch = msg(b'P', b"\0select 1\0\0\0");
        batch.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
        batch.extend(msg(b'E', b"\0\0\0\0\0"));
        batch.extend(msg(b'S', b""));
        t.client(&batch);
        let mut reply = msg(b'1', b"");
        reply.extend(msg(b'2', b""));
        reply.extend(msg(b'C', b"SELECT 1\0"));
        reply.extend(msg(b'Z', b"I"));
        // Split anywhere, even inside ReadyForQuery's header.
        for cut in 0..reply.len() {
            let mut t2 = Tracker::new();
            t2.client(&batch);
            t2.server(&reply[..cut]);
            t2.server(&reply[cut..]);
            assert_eq!(t2.client(TERMINATE), 0, "cut at {cut}");
        }
    }

    #[test]
    fn a_terminate_split_across_reads_passes() {
        let mut t = Tracker::new();
        assert_eq!(t.client(&TERMINATE[..2]), 2);
        assert_eq!(t.client(&TERMINATE[2..]), 3);
        assert!(!t.terminated());
    }

    #[test]
    fn copy_in_ends_settled() {
        let mut t = Tracker::new();
        t.client(&msg(b'Q', b"copy t from stdin\0"));
        t.server(&msg(b'G', b"\0\0\0"));
        let mut data = msg(b'd', b"1\n");
        data.extend(msg(b'c', b""));
        t.client(&data);
        assert_eq!(
            t.client(TERMINATE),
            TERMINATE.len(),
            "COPY not answered yet"
        );
        let mut t = Tracker::new();
        t.client(&msg(b'Q', b"copy t from stdin\0"));
        t.server(&msg(b'G', b"\0\0\0"));
        t.client(&data);
        answer(&mut t, b'I');
        assert_eq!(t.client(TERMINATE), 0);
    }

    #[test]
    fn a_notification_mid_message_is_not_clean() {
        let mut t = Tracker::new();
        let note = msg(b'A', b"\0\0\0\x01chan\0payload\0");
        t.server(&note[..4]);
        assert_eq!(t.client(TERMINATE), TERMINATE.len());
    }
}
