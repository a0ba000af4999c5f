//! The proxy's end of the helper: requests written to the helper's stdin, answers
//! read from its stdout by one thread and handed to whoever waits for that `id`.
//! Callers on the async runtime await their answer; blocking callers (copies run
//! on blocking threads) wait on a plain channel.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};

use tracing::error;

use super::wire::{Op, Reply, Request, Response, WireError};

type Answer = Result<Reply, WireError>;

enum Waiter {
    Async(tokio::sync::oneshot::Sender<Answer>),
    Blocking(mpsc::Sender<Answer>),
}

impl Waiter {
    fn send(self, answer: Answer) {
        match self {
            Waiter::Async(tx) => {
                let _ = tx.send(answer);
            }
            Waiter::Blocking(tx) => {
                let _ = tx.send(answer);
            }
        }
    }
}

/// The proxy's handle on its privileged helper.
pub struct Channel {
    stdin: Mutex<Option<ChildStdin>>,
    next: AtomicU64,
    /// Requests sent and not yet answered; `None` once the helper is gone.
    waiting: Mutex<Option<HashMap<u64, Waiter>>>,
    pid: u32,
}

fn gone() -> WireError {
    WireError::Refused("the privileged helper has exited".into())
}

impl Channel {
    /// Takes over a spawned helper: its stdin for requests, a thread reading its
    /// stdout for answers.
    pub(super) fn new(mut child: Child) -> std::io::Result<&'static Channel> {
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("no stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let channel: &'static Channel = Box::leak(Box::new(Channel {
            stdin: Mutex::new(Some(stdin)),
            next: AtomicU64::new(1),
            waiting: Mutex::new(Some(HashMap::new())),
            pid: child.id(),
        }));
        std::thread::Builder::new()
            .name("privsep-answers".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let response: Response = match serde_json::from_str(&line) {
                        Ok(r) => r,
                        Err(e) => {
                            error!(error = %e, "unreadable answer from the privileged helper");
                            continue;
                        }
                    };
                    let waiter = channel
                        .waiting
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_mut()
                        .and_then(|w| w.remove(&response.id));
                    if let Some(w) = waiter {
                        w.send(response.result);
                    }
                }
                let status = child.wait();
                error!(?status, "the privileged helper exited: branch servers can no longer be started or stopped");
                let left = channel
                    .waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                for (_, w) in left.into_iter().flatten() {
                    w.send(Err(gone()));
                }
            })?;
        Ok(channel)
    }

    /// The helper's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn send(&self, op: Op, waiter: Waiter) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            match waiting.as_mut() {
                Some(w) => {
                    w.insert(id, waiter);
                }
                None => return waiter.send(Err(gone())),
            }
        }
        let mut line = match serde_json::to_vec(&Request { id, op }) {
            Ok(l) => l,
            Err(e) => return self.fail(id, WireError::Refused(e.to_string())),
        };
        line.push(b'\n');
        let written = {
            let mut stdin = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
            match stdin.as_mut() {
                Some(s) => s.write_all(&line).and_then(|()| s.flush()),
                None => Err(std::io::Error::other("closed")),
            }
        };
        if written.is_err() {
            self.fail(id, gone());
        }
    }

    fn fail(&self, id: u64, e: WireError) {
        let waiter = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .and_then(|w| w.remove(&id));
        if let Some(w) = waiter {
            w.send(Err(e));
        }
    }

    /// Sends `op` and waits for its answer.
    pub async fn call(&self, op: Op) -> Answer {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(op, Waiter::Async(tx));
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Sends `op` and blocks this thread until it is answered.
    pub fn call_blocking(&self, op: Op) -> Answer {
        let (tx, rx) = mpsc::channel();
        self.send(op, Waiter::Blocking(tx));
        rx.recv().unwrap_or_else(|_| Err(gone()))
    }
}
