//! The stall watchdog: hf-hub 0.4.3 builds its HTTP client (ureq) without read timeouts and
//! offers no way to set them, so a server that stops sending mid-file, or never answers, would
//! block a download forever. [`watch`] runs each request on a worker thread and waits for it on a
//! channel; every sign of life (response headers, each chunk of bytes) resets the clock, and
//! [`HubOptions::stall_timeout`](super::HubOptions::stall_timeout) without one gives up.
//!
//! A worker given up on may stay blocked in a socket read: nothing can interrupt it. It holds no
//! more than its connection and, for a file, hf-hub's lock and its `blobs/{etag}.part`, and it
//! dies with the process (the CLI exits on the error). Should bytes come after all, its next
//! progress report finds the channel closed and unwinds the worker ([`Abandoned`]) before it
//! writes them, so the `.part` file keeps only what arrived before, is never renamed to a
//! complete-looking blob, and the next run resumes it with a `Range` request.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::Duration;

/// A sign of life from a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// A response started; for a file, hf-hub's announced size in bytes (a resumed transfer
    /// reports its offset as [`Beat::Bytes`] next).
    Start(u64),
    /// This many more bytes arrived.
    Bytes(u64),
    /// The transfer ended.
    End,
}

enum Msg<T> {
    Beat(Beat),
    Done(T),
    Panicked(Box<dyn std::any::Any + Send>),
}

/// The unwind payload that stops a worker whose caller has given up: raised with
/// `resume_unwind`, so no panic message is printed.
struct Abandoned;

/// The worker's end of the channel; also hf-hub's [`Progress`](hf_hub::api::Progress) hook.
pub struct Beats<T>(Sender<Msg<T>>);

impl<T> Clone for Beats<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Beats<T> {
    /// Reports a sign of life. When the caller has given up (the channel is closed), unwinds the
    /// worker instead, before it does anything with the bytes just read.
    pub fn send(&self, beat: Beat) {
        if self.0.send(Msg::Beat(beat)).is_err() {
            resume_unwind(Box::new(Abandoned));
        }
    }
}

impl<T> hf_hub::api::Progress for Beats<T> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.send(Beat::Start(size as u64));
    }

    fn update(&mut self, size: usize) {
        self.send(Beat::Bytes(size as u64));
    }

    fn finish(&mut self) {
        // Every byte is in: let hf-hub rename the complete file into its blob even if the
        // caller has just given up.
        let _ = self.0.send(Msg::Beat(Beat::End));
    }
}

/// Reads through `inner`, reporting each chunk as a [`Beat::Bytes`].
pub struct BeatReader<R, T> {
    /// The body being read.
    pub inner: R,
    /// Where the beats go.
    pub beats: Beats<T>,
}

impl<R: std::io::Read, T> std::io::Read for BeatReader<R, T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.beats.send(Beat::Bytes(n as u64));
        Ok(n)
    }
}

/// Runs `work` on a worker thread, handing each of its beats to `on_beat` on this thread, and
/// returns its result; `None` when `stall` passed without a beat (see the module docs for what
/// becomes of the worker). A panic in `work` is resumed here.
pub fn watch<T: Send + 'static>(
    stall: Duration,
    on_beat: &mut dyn FnMut(Beat),
    work: impl FnOnce(Beats<T>) -> T + Send + 'static,
) -> std::io::Result<Option<T>> {
    let (tx, rx) = mpsc::channel();
    let beats = Beats(tx);
    let done = beats.clone();
    std::thread::Builder::new().name("sdgen-hub-download".into()).spawn(move || {
        let msg = match catch_unwind(AssertUnwindSafe(|| work(beats))) {
            Ok(out) => Msg::Done(out),
            Err(payload) if payload.is::<Abandoned>() => return,
            Err(payload) => Msg::Panicked(payload),
        };
        let _ = done.0.send(msg);
    })?;
    loop {
        match rx.recv_timeout(stall) {
            Ok(Msg::Beat(beat)) => on_beat(beat),
            Ok(Msg::Done(out)) => return Ok(Some(out)),
            Ok(Msg::Panicked(payload)) => resume_unwind(payload),
            // Returning drops the receiver, which is what tells the worker it was given up on.
            Err(RecvTimeoutError::Timeout) => return Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                unreachable!("the worker always sends its outcome unless abandoned")
            }
        }
    }
}

/// `1 s`, `1.5 s`: a timeout for messages.
pub fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn returns_the_result_and_forwards_beats() {
        let mut seen = Vec::new();
        let out = watch(Duration::from_secs(5), &mut |b| seen.push(b), |beats: Beats<u32>| {
            beats.send(Beat::Start(3));
            beats.send(Beat::Bytes(3));
            7
        })
        .unwrap();
        assert_eq!(out, Some(7));
        assert_eq!(seen, [Beat::Start(3), Beat::Bytes(3)]);
    }

    #[test]
    fn beats_keep_a_slow_worker_alive_and_silence_gives_up() {
        let slow = |beats: Beats<()>| {
            for _ in 0..12 {
                std::thread::sleep(Duration::from_millis(50));
                beats.send(Beat::Bytes(1));
            }
        };
        // 600 ms of work, never 250 ms without a beat (5× the beat interval: a loaded machine
        // may stretch a 50 ms sleep).
        assert_eq!(watch(Duration::from_millis(250), &mut |_| {}, slow).unwrap(), Some(()));

        let unwound = Arc::new(AtomicBool::new(false));
        let (flag, (go_tx, go_rx)) = (unwound.clone(), mpsc::channel::<()>());
        let silent = move |beats: Beats<()>| {
            struct SetOnDrop(Arc<AtomicBool>);
            impl Drop for SetOnDrop {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::SeqCst);
                }
            }
            let _guard = SetOnDrop(flag);
            go_rx.recv().unwrap();
            // The caller has given up: this unwinds instead of going on.
            beats.send(Beat::Bytes(1));
            panic!("not reached");
        };
        let start = std::time::Instant::now();
        assert_eq!(watch(Duration::from_millis(100), &mut |_| {}, silent).unwrap(), None);
        assert!(start.elapsed() < Duration::from_secs(2));
        go_tx.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !unwound.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(unwound.load(Ordering::SeqCst), "the abandoned worker did not stop");
    }

    #[test]
    fn seconds_read_well() {
        assert_eq!(seconds(Duration::from_secs(60)), "60 s");
        assert_eq!(seconds(Duration::from_millis(1500)), "1.5 s");
    }
}
