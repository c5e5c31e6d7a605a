//! Log output without a system call per line: a formatted line is appended to a shared buffer,
//! and the buffer goes to stderr when it passes [`BATCH_BYTES`], every [`FLUSH_EVERY`] from a
//! background thread, at once for warnings and errors, and on [`flush`] (keygate calls it
//! before exiting, and from the panic hook). Lines keep their order.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// A buffer this large is written at once by the thread that filled it.
pub const BATCH_BYTES: usize = 32 * 1024;
/// The longest a line waits in the buffer when traffic is light.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

struct Shared {
    /// Lines not yet written.
    pending: Mutex<Vec<u8>>,
    /// Held while a batch is taken and written, so batches reach stderr in order.
    output: Mutex<()>,
}

static SHARED: Shared = Shared::new();

impl Shared {
    const fn new() -> Self {
        Shared {
            pending: Mutex::new(Vec::new()),
            output: Mutex::new(()),
        }
    }

    /// Add a whole line after every pending one; whether the batch must be written now (full,
    /// or `urgent`: a warning or error goes out together with the lines logged before it, so
    /// the output stays in timestamp order).
    fn push(&self, line: &[u8], urgent: bool) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.extend_from_slice(line);
        urgent || pending.len() >= BATCH_BYTES
    }

    /// Write every pending line to `out`, in order.
    fn flush_to(&self, out: &mut dyn Write) {
        let _order = self.output.lock().unwrap_or_else(|e| e.into_inner());
        let batch = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.is_empty() {
                return;
            }
            std::mem::replace(&mut *pending, Vec::with_capacity(BATCH_BYTES + 4096))
        };
        // Nowhere to report a failed write to stderr: the lines are dropped.
        let _ = out.write_all(&batch);
        let _ = out.flush();
    }
}

/// Write every pending line to stderr now.
pub fn flush() {
    SHARED.flush_to(&mut std::io::stderr().lock());
}

/// Add a whole line (or lines); `urgent` writes the batch at once.
pub(crate) fn append(line: &[u8], urgent: bool) {
    if SHARED.push(line, urgent) {
        flush();
    }
}

/// The `MakeWriter` for `tracing_subscriber::fmt`. Starts the flushing thread on first use.
#[derive(Clone, Copy, Default)]
pub struct BatchedStderr;

impl BatchedStderr {
    pub fn new() -> Self {
        static FLUSHER: OnceLock<()> = OnceLock::new();
        FLUSHER.get_or_init(|| {
            let spawned = std::thread::Builder::new()
                .name("keygate-log".into())
                .spawn(|| loop {
                    std::thread::sleep(FLUSH_EVERY);
                    flush();
                });
            if spawned.is_err() {
                eprintln!("keygate: could not start the log flusher; lines wait for a full batch");
            }
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                flush();
                previous(info);
            }));
        });
        Self
    }
}

/// One event's output: the formatting layer writes the whole line with one `write_all`.
pub struct Line {
    urgent: bool,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        append(buf, self.urgent);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { urgent: false }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        Line {
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warning_is_written_after_the_lines_logged_before_it() {
        let shared = Shared::new();
        assert!(!shared.push(b"12:00:00.001 INFO first\n", false));
        assert!(!shared.push(b"12:00:00.002 INFO second\n", false));
        assert!(shared.push(b"12:00:00.003 WARN third\n", true));
        let mut out = Vec::new();
        shared.flush_to(&mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "12:00:00.001 INFO first\n12:00:00.002 INFO second\n12:00:00.003 WARN third\n"
        );
        let mut again = Vec::new();
        shared.flush_to(&mut again);
        assert!(again.is_empty());
    }
}
