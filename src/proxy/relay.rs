//! The byte pump after startup: no message parsing, as few syscalls as possible.
//! Where the server session may be kept for another client, a [`Tracker`] is
//! shown each read (headers only) and holds back a clean Terminate.
//!
//! A request/response round trip costs four syscalls here (read and write in each
//! direction) plus the amortised `epoll_wait`. Two things make that so:
//! - after a short read the socket is known to be drained, so readiness is cleared
//!   right away instead of paying for a read that returns `EAGAIN`;
//! - data is read into a per-thread scratch buffer and written straight on; only
//!   bytes a full socket would not take are copied into a per-connection buffer,
//!   which is freed once drained. Idle connections therefore hold no buffers.
//!
//! Connections live on a pool of single-threaded runtimes ("relay threads") from
//! accept to close, so a busy connection never wakes a second thread. TLS clients
//! are relayed with tokio's generic copy instead of the pump.

use std::cell::RefCell;
use std::future::poll_fn;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Wake, Waker};

use prometheus::IntCounter;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tracing::debug;

use super::track::Tracker;

/// Size of the per-thread read buffer.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
    /// Which relay thread this is (`None` on any other thread).
    static RELAY_INDEX: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// A tokio socket the pump can drive directly.
pub trait RawSocket: AsFd {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

macro_rules! raw_socket {
    ($t:ty) => {
        impl RawSocket for $t {
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_write_ready(self, cx)
            }
            fn try_io<R>(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                <$t>::try_io(self, interest, f)
            }
        }
    };
}
raw_socket!(TcpStream);
raw_socket!(UnixStream);

/// One direction of a connection.
struct Half {
    /// Bytes read but not yet accepted by the destination.
    pending: Vec<u8>,
    pos: usize,
    eof: bool,
    /// The scan held back the rest of the stream (the client's Terminate).
    cut: bool,
    bytes: IntCounter,
}

/// Why a direction stopped.
enum Stop {
    /// Its source ended.
    Eof,
    /// Its scan held back the rest.
    Cut,
}

impl Half {
    fn new(bytes: IntCounter) -> Self {
        Self {
            pending: Vec::new(),
            pos: 0,
            eof: false,
            cut: false,
            bytes,
        }
    }

    /// Moves bytes from `from` to `to` until `from` has nothing more right now.
    /// Ready(Ok) once `from` has ended, or `scan` (shown each read, returning how
    /// much of it to pass on) held back the rest, and everything was delivered.
    fn poll<A: RawSocket, B: RawSocket>(
        &mut self,
        cx: &mut Context<'_>,
        from: &A,
        to: &B,
        mut scan: impl FnMut(&[u8]) -> usize,
    ) -> Poll<io::Result<Stop>> {
        loop {
            if self.pos < self.pending.len() {
                let data = &self.pending[self.pos..];
                match to.try_io(Interest::WRITABLE, || (&*SockRef::from(to)).write(data)) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.pos += n;
                        if self.pos == self.pending.len() {
                            self.pending = Vec::new();
                            self.pos = 0;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(to.poll_write_ready(cx))?;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            if self.cut {
                return Poll::Ready(Ok(Stop::Cut));
            }
            if self.eof {
                let _ = SockRef::from(to).shutdown(Shutdown::Write);
                return Poll::Ready(Ok(Stop::Eof));
            }
            ready!(from.poll_read_ready(cx))?;
            let step = SCRATCH_BUF.with(|cell| {
                let mut scratch = cell.borrow_mut();
                let cap = scratch.len();
                let mut got = 0;
                let read = from.try_io(Interest::READABLE, || {
                    let n = (&*SockRef::from(from)).read(&mut scratch[..])?;
                    got = n;
                    if n > 0 && n < cap {
                        // Drained: clear readiness now rather than after an EAGAIN read.
                        Err(io::ErrorKind::WouldBlock.into())
                    } else {
                        Ok(n)
                    }
                });
                match read {
                    Ok(0) => {
                        self.eof = true;
                        return Ok(());
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => {}
                    Err(e) => return Err(e),
                }
                self.bytes.inc_by(got as u64);
                let pass = scan(&scratch[..got]);
                if pass < got {
                    self.cut = true;
                }
                let data = &scratch[..pass];
                let written =
                    match to.try_io(Interest::WRITABLE, || (&*SockRef::from(to)).write(data)) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                        Err(e) => return Err(e),
                    };
                if written < got {
                    self.pending.extend_from_slice(&data[written..]);
                }
                Ok(())
            });
            match step {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Byte counters of the two directions.
#[derive(Clone)]
pub struct Counters {
    pub to_server: IntCounter,
    pub to_client: IntCounter,
}

/// How a relayed session ended.
pub enum End {
    /// Either side closed (or the client left mid-transaction): the server
    /// session ends with it.
    Closed,
    /// The client ended cleanly (Terminate, idle, nothing unanswered) and its
    /// Terminate was held back: the server session is open, idle, and may be kept.
    Idle(super::backend::ServerStream),
}

/// Pumps bytes both ways until either side has closed (after passing on what it
/// sent), or either fails. With a `tracker`, a client's clean Terminate is held
/// back instead and the pump returns `true`: the server session stays open.
///
/// PostgreSQL clients never half-close: a client's end of stream follows its
/// Terminate, and nothing the server might still send has a reader. Ending there,
/// rather than waiting for the server process to exit, frees the connection at once.
/// Likewise, once the server has closed, nothing the client sends can be answered.
pub async fn pump<C: RawSocket, S: RawSocket>(
    client: &C,
    server: &S,
    counters: Counters,
    mut tracker: Option<&mut Tracker>,
) -> io::Result<bool> {
    let mut up = Half::new(counters.to_server);
    let mut down = Half::new(counters.to_client);
    poll_fn(|cx| {
        let up_scan = |d: &[u8]| match tracker.as_deref_mut() {
            Some(t) => t.client(d),
            None => d.len(),
        };
        if let Poll::Ready(r) = up.poll(cx, client, server, up_scan) {
            return Poll::Ready(r.map(|stop| matches!(stop, Stop::Cut)));
        }
        let down_scan = |d: &[u8]| {
            if let Some(t) = tracker.as_deref_mut() {
                t.server(d);
            }
            d.len()
        };
        down.poll(cx, server, client, down_scan).map_ok(|_| false)
    })
    .await
}

/// Relays an open session until either side closes: plain client sockets go
/// through the [`pump`], TLS on either side through tokio's generic [`copy`].
/// `keep`: follow the session so that a clean end leaves the server session open
/// ([`End::Idle`]); only sessions over plain TCP or Unix sockets are kept.
/// The client is borrowed, so the caller can still tell it why the session ended
/// when the relay is stopped from outside.
pub async fn run(
    client: &mut super::ClientStream,
    server: super::backend::ServerStream,
    counters: &Counters,
    keep: bool,
) -> io::Result<End> {
    use super::backend::ServerStream;
    use super::ClientStream;
    let mut tracker = keep.then(Tracker::new);
    match (client, server) {
        (ClientStream::Plain(c), ServerStream::Tcp(s)) => {
            let idle = pump(&*c, &s, counters.clone(), tracker.as_mut()).await?;
            Ok(if idle {
                End::Idle(ServerStream::Tcp(s))
            } else {
                End::Closed
            })
        }
        (ClientStream::Plain(c), ServerStream::Unix(s)) => {
            let idle = pump(&*c, &s, counters.clone(), tracker.as_mut()).await?;
            Ok(if idle {
                End::Idle(ServerStream::Unix(s))
            } else {
                End::Closed
            })
        }
        (client, mut server) => {
            copy(client, &mut server, counters).await?;
            Ok(End::Closed)
        }
    }
}

/// Generic relay for streams the pump cannot drive directly (TLS).
pub async fn copy<C, S>(client: &mut C, server: &mut S, counters: &Counters) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (up, down) = tokio::io::copy_bidirectional(client, server).await?;
    counters.to_server.inc_by(up);
    counters.to_client.inc_by(down);
    Ok(())
}

/// Relay threads when `proxy.relay_threads` is 0: half the CPU cores, at least one.
///
/// A relay thread spends nearly all of its time in the kernel (socket reads and
/// writes, `epoll_wait`, being woken), and every wake-up it saves is a context
/// switch. The fewer threads share the connections, the more ready sockets each
/// `epoll_wait` returns: on two cores shared with PostgreSQL and the clients, one
/// thread woke 0.4–0.5 times per `pgbench -S` transaction against 0.6–0.9 for
/// two, for the same number of socket calls. The other half of the cores is left
/// to the servers the proxy feeds.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// The relay thread this is (`None` on any other thread). A socket registered
/// with a relay thread's runtime is driven by that thread's event loop: it can be
/// used on no other without waking that one for each of its events.
pub fn current() -> Option<usize> {
    RELAY_INDEX.with(|c| c.get())
}

/// Polls a rarely ready future again only once it has woken its task. Beside the
/// pump, a future behind locks (a cancellation token takes two mutexes per
/// poll) would otherwise be polled at every wake-up of a busy connection.
pub struct WhenWoken<'a, F> {
    inner: Pin<&'a mut F>,
    /// Set after the first poll: the waker given to `inner`, and the task's
    /// waker it forwards to.
    armed: Option<(Arc<Flag>, Waker)>,
}

struct Flag {
    woken: AtomicBool,
    task: Mutex<Waker>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .wake_by_ref();
    }
}

impl<'a, F: Future> WhenWoken<'a, F> {
    pub fn new(inner: Pin<&'a mut F>) -> Self {
        Self { inner, armed: None }
    }
}

impl<F: Future> Future for WhenWoken<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let flag = match &mut this.armed {
            Some((flag, task)) => {
                if task.will_wake(cx.waker()) {
                    if !flag.woken.swap(false, Ordering::AcqRel) {
                        return Poll::Pending;
                    }
                } else {
                    // Polled from another task: forward to that one from now on.
                    task.clone_from(cx.waker());
                    *flag.task.lock().unwrap_or_else(|p| p.into_inner()) = cx.waker().clone();
                }
                flag.clone()
            }
            None => {
                let flag = Arc::new(Flag {
                    woken: AtomicBool::new(false),
                    task: Mutex::new(cx.waker().clone()),
                });
                this.armed = Some((flag.clone(), cx.waker().clone()));
                flag
            }
        };
        let waker = Waker::from(flag);
        this.inner.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

/// A connection's whole life, from its first byte to its last.
pub type ConnFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Single-threaded runtimes ("relay threads") that each run connections from
/// accept to close, assigned round-robin. A connection never changes thread, so a
/// busy one wakes no other thread.
pub struct RelayPool {
    workers: Vec<mpsc::UnboundedSender<ConnFuture>>,
    next: AtomicUsize,
}

impl RelayPool {
    /// Starts `threads` relay threads; 0 means [`default_threads`].
    pub fn start(threads: usize) -> io::Result<Self> {
        let threads = match threads {
            0 => default_threads(),
            n => n,
        };
        let mut workers = Vec::new();
        for i in 0..threads {
            let (tx, mut rx) = mpsc::unbounded_channel::<ConnFuture>();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            std::thread::Builder::new()
                .name(format!("offshoot-relay-{i}"))
                .spawn(move || {
                    RELAY_INDEX.with(|c| c.set(Some(i)));
                    rt.block_on(async move {
                        while let Some(conn) = rx.recv().await {
                            tokio::spawn(conn);
                        }
                    })
                })?;
            workers.push(tx);
        }
        Ok(Self {
            workers,
            next: AtomicUsize::new(0),
        })
    }

    /// The relay thread the next connection goes to (round-robin).
    pub fn next(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len()
    }

    /// Runs `task` on relay thread `i` (modulo their number): started right here
    /// when that is the calling thread, so that no other thread has to be woken
    /// for it.
    pub fn spawn_on(&self, i: usize, task: ConnFuture) {
        let i = i % self.workers.len();
        if current() == Some(i) {
            tokio::spawn(task);
        } else if self.workers[i].send(task).is_err() {
            debug!("relay thread gone; dropping connection");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn when_woken_polls_its_future_again_only_after_it_woke() {
        let polls = std::cell::Cell::new(0);
        let ready = std::cell::Cell::new(false);
        let registered: RefCell<Option<Waker>> = RefCell::new(None);
        let inner = std::pin::pin!(std::future::poll_fn(|cx| {
            polls.set(polls.get() + 1);
            *registered.borrow_mut() = Some(cx.waker().clone());
            if ready.get() {
                Poll::Ready(7)
            } else {
                Poll::Pending
            }
        }));
        let mut when = WhenWoken::new(inner);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let mut cx = Context::from_waker(&task);
        assert!(Pin::new(&mut when).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut when).poll(&mut cx).is_pending());
        assert_eq!(polls.get(), 1, "not polled again before it woke");

        ready.set(true);
        registered.take().unwrap().wake();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "its wake reaches the task"
        );
        assert_eq!(Pin::new(&mut when).poll(&mut cx), Poll::Ready(7));
        assert_eq!(polls.get(), 2);
    }

    #[test]
    fn when_woken_polls_again_for_another_task() {
        let polls = std::cell::Cell::new(0);
        let inner = std::pin::pin!(std::future::poll_fn(|_| {
            polls.set(polls.get() + 1);
            Poll::<()>::Pending
        }));
        let mut when = WhenWoken::new(inner);
        let first = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let second = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        assert!(Pin::new(&mut when)
            .poll(&mut Context::from_waker(&first))
            .is_pending());
        assert!(Pin::new(&mut when)
            .poll(&mut Context::from_waker(&second))
            .is_pending());
        assert_eq!(polls.get(), 2, "a new task's waker is handed to the future");
    }

    #[test]
    fn default_threads_leave_half_the_cores() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = default_threads();
        assert!(threads >= 1);
        assert!(
            threads <= cores.div_ceil(2),
            "{threads} threads on {cores} cores"
        );
    }
}
