//! Linux `/proc/self` readers: the cheap RSS read the sampler uses 50 times a second, and the
//! kernel's resettable RSS high-water mark (`VmHWM`, reset through `clear_refs`).
//!
//! Files are read into stack buffers so that sampling never allocates: the sampler must not
//! disturb the heap it is measuring.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::sync::OnceLock;

/// `CLEAR_REFS_MM_HIWATER_RSS` in `fs/proc/task_mmu.c` (Linux ≥ 4.0): sets the process's
/// `hiwater_rss` to its current RSS. See `man 5 proc`, `/proc/pid/clear_refs`.
const CLEAR_REFS_RESET_HWM: &[u8] = b"5";

/// Slack allowed between `VmHWM` and `VmRSS` right after a reset before the reset is declared
/// ineffective: another thread may free memory between the write and the read.
const RESET_VERIFY_SLACK_BYTES: u64 = 8 << 20;

fn page_size_bytes() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions; it returns -1 on error, handled below.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            page as u64
        } else {
            4096
        }
    })
}

/// Reads a small `/proc` file into `buf`, returning the filled prefix.
fn read_small<'a>(path: &str, buf: &'a mut [u8]) -> Option<&'a str> {
    let mut file = File::open(path).ok()?;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    std::str::from_utf8(&buf[..filled]).ok()
}

/// `(rss_bytes, vms_bytes)` from `/proc/self/statm` — the same source psutil's
/// `memory_info()` uses on Linux, so numbers compare with the seed's.
pub(crate) fn statm() -> Option<(u64, u64)> {
    let mut buf = [0u8; 256];
    let text = read_small("/proc/self/statm", &mut buf)?;
    let mut fields = text.split_ascii_whitespace();
    let vms_pages: u64 = fields.next()?.parse().ok()?;
    let rss_pages: u64 = fields.next()?.parse().ok()?;
    let page = page_size_bytes();
    Some((rss_pages * page, vms_pages * page))
}

/// `(hwm_bytes, rss_bytes)`: `VmHWM` and `VmRSS` from one read of `/proc/self/status`, so the
/// pair is consistent.
pub(crate) fn hwm_and_rss() -> Option<(u64, u64)> {
    // /proc/self/status is ~1.5 KB; 8 KB leaves room for long Cpus_allowed lines on big hosts.
    let mut buf = [0u8; 8192];
    let text = read_small("/proc/self/status", &mut buf)?;
    let kib = |key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        let value = line[key.len()..].trim().strip_suffix("kB")?.trim();
        value.parse::<u64>().ok().map(|k| k * 1024)
    };
    Some((kib("VmHWM:")?, kib("VmRSS:")?))
}

/// Resets the kernel's RSS high-water mark to the current RSS and checks that it took: after a
/// working reset `VmHWM` is (about) `VmRSS`. Returns false when the file is missing or not
/// writable (some sandboxes, gVisor) or the kernel ignored the write.
pub(crate) fn reset_hwm() -> bool {
    let written = OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")
        .and_then(|mut f| f.write_all(CLEAR_REFS_RESET_HWM))
        .is_ok();
    if !written {
        return false;
    }
    match hwm_and_rss() {
        Some((hwm, rss)) => hwm <= rss + RESET_VERIFY_SLACK_BYTES,
        None => false,
    }
}

/// The kernel thread id of the calling thread (what `/proc/self/task/<tid>` is named after).
pub(crate) fn current_thread_id() -> u64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u64 }
}
