//! Progress for long operations (a snapshot, a reset, a rehearsal): a spinner with
//! the elapsed time on standard error, drawn only when standard output and
//! standard error are both a terminal, so piped or scripted runs stay quiet.
//!
//! ```no_run
//! let spinner = offshoot::cli::progress::Spinner::start("taking a snapshot of shop");
//! // ... the long request ...
//! spinner.finish();
//! ```

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
const TICK: Duration = Duration::from_millis(120);

/// A running spinner; [`Spinner::finish`] (or dropping it) clears its line.
pub struct Spinner {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Whether progress is drawn: only for a person watching a terminal.
pub fn on_terminal() -> bool {
    std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

impl Spinner {
    /// Starts a spinner saying `what` (drawn only on a terminal).
    pub fn start(what: impl Into<String>) -> Self {
        Self::start_if(on_terminal(), what)
    }

    /// Starts a spinner that draws only if `draw`.
    pub fn start_if(draw: bool, what: impl Into<String>) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let thread = draw.then(|| {
            let done = done.clone();
            let what = what.into();
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut err = std::io::stderr();
                let mut frame = 0;
                while !done.load(Ordering::Relaxed) {
                    let secs = started.elapsed().as_secs();
                    let _ = write!(err, "\r{} {what} ({secs}s)", FRAMES[frame % FRAMES.len()]);
                    let _ = err.flush();
                    frame += 1;
                    std::thread::sleep(TICK);
                }
                // Clear the line, so what the command prints next starts clean.
                let _ = write!(err, "\r\x1b[2K");
                let _ = err.flush();
            })
        });
        Self { done, thread }
    }

    /// Stops and clears the spinner.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_spinner_starts_no_thread() {
        let s = Spinner::start_if(false, "x");
        assert!(s.thread.is_none());
        s.finish();
    }
}
