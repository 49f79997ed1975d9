//! Memory limits set on this process: its address-space limit (`ulimit -v`, `RLIMIT_AS`) and its
//! cgroup's `memory.max` (containers, systemd units). On the CPU they are part of the budget:
//! past them an allocation fails where Rust cannot recover and the process aborts, so a plan that
//! ignored them would say "fits" and then crash.

/// Which limit it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// `ulimit -v` (`RLIMIT_AS`): counts the address space (mapped files and reserved but untouched
    /// memory too), so its room is measured against the process's virtual size.
    AddressSpace,
    /// A cgroup's `memory.max` (v2) or `memory.limit_in_bytes` (v1): counts the group's charged
    /// memory.
    Cgroup,
}

/// A limit on this process's memory and the room left under it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessLimit {
    /// Which limit.
    pub kind: LimitKind,
    /// The limit.
    pub limit_bytes: u64,
    /// What this process may still allocate before reaching it.
    pub room_bytes: u64,
}

/// The tightest memory limit on this process (the least room), if any is set.
pub fn process_memory_limit() -> Option<ProcessLimit> {
    [address_space_limit(), cgroup_limit()].into_iter().flatten().min_by_key(|l| l.room_bytes)
}

#[cfg(unix)]
fn address_space_limit() -> Option<ProcessLimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit struct, which `limit` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not on every unix
    let limit_bytes = limit.rlim_cur as u64;
    let (_, vms) = crate::info::process_memory();
    Some(ProcessLimit { kind: LimitKind::AddressSpace, limit_bytes, room_bytes: limit_bytes.saturating_sub(vms) })
}

#[cfg(not(unix))]
fn address_space_limit() -> Option<ProcessLimit> {
    None
}

/// cgroup v1 reports "no limit" as a page-rounded `i64::MAX`: anything this large is none.
const UNLIMITED_ABOVE: u64 = 1 << 60;

/// The tightest `memory.max` of this process's cgroup and its ancestors (v2), or its memory
/// controller's limit (v1).
fn cgroup_limit() -> Option<ProcessLimit> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |path: &str| std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let mut best: Option<ProcessLimit> = None;
    let mut consider = |limit: Option<u64>, usage: Option<u64>| {
        if let (Some(limit_bytes), Some(usage)) = (limit.filter(|&l| l < UNLIMITED_ABOVE), usage) {
            let l =
                ProcessLimit { kind: LimitKind::Cgroup, limit_bytes, room_bytes: limit_bytes.saturating_sub(usage) };
            if best.is_none_or(|b| l.room_bytes < b.room_bytes) {
                best = Some(l);
            }
        }
    };
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.is_empty() {
            // v2: the group and every ancestor may limit it ("max" reads as no number).
            let mut dir = format!("/sys/fs/cgroup{}", path.trim_end_matches('/'));
            loop {
                consider(read(&format!("{dir}/memory.max")), read(&format!("{dir}/memory.current")));
                match dir.rfind('/') {
                    Some(i) if dir.len() > "/sys/fs/cgroup".len() => dir.truncate(i),
                    _ => break,
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = format!("/sys/fs/cgroup/memory{}", path.trim_end_matches('/'));
            consider(read(&format!("{dir}/memory.limit_in_bytes")), read(&format!("{dir}/memory.usage_in_bytes")));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_space_limit_is_seen_with_its_room() {
        // Set in a child process so the test runner keeps its own limits.
        let exe = std::env::current_exe().unwrap();
        if std::env::var_os("SDGEN_LIMIT_CHILD").is_some() {
            let l = address_space_limit().expect("the limit set by the parent");
            assert_eq!(l.limit_bytes, 8 << 30);
            assert!(l.room_bytes > 0 && l.room_bytes < l.limit_bytes);
            let tightest = process_memory_limit().unwrap();
            assert!(tightest.room_bytes <= l.room_bytes);
            return;
        }
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -v {} && exec \"$0\" an_address_space_limit_is_seen_with_its_room --nocapture",
                8u64 << 20
            ))
            .arg(&exe)
            .env("SDGEN_LIMIT_CHILD", "1")
            .status()
            .unwrap();
        assert!(status.success());
    }
}
