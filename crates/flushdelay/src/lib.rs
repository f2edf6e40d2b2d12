//! Storage with a slower commit flush, for `make bench`.
//!
//! The performance targets (docs/performance.md) compare Leasehold with the per-message upsert,
//! whose rate is set by the cost of one WAL flush per message. The reference machine flushes in
//! about 1 ms (≈930 upserts/s); a fast virtual disk flushes in about 0.1 ms, which makes the
//! baseline ten times faster and the ratio meaningless, since twenty times that exceeds the
//! broker itself. Loaded into PostgreSQL
//! with `LD_PRELOAD`, this library tops every `fsync`/`fdatasync` up to
//! `LEASEHOLD_FLUSH_LATENCY_US` microseconds (default 1000) after the real flush has completed:
//! durability is unchanged, only the latency is that of slower storage. Everything else
//! (writes, reads, CPU) is the machine's own.
//!
//! # Layout
//!
//! Two exported symbols, `fsync` and `fdatasync`, each resolving the C library's own with
//! `dlsym(RTLD_NEXT, ..)` on first use.

use std::ffi::c_int;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

type FlushFn = unsafe extern "C" fn(c_int) -> c_int;

fn latency() -> Duration {
    static L: OnceLock<Duration> = OnceLock::new();
    *L.get_or_init(|| {
        let us = std::env::var("LEASEHOLD_FLUSH_LATENCY_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(1000);
        Duration::from_micros(us)
    })
}

fn next(name: &'static [u8], slot: &'static OnceLock<usize>) -> Option<FlushFn> {
    let addr = *slot.get_or_init(|| {
        // SAFETY: `name` is NUL-terminated; RTLD_NEXT asks for the definition after this library.
        unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) as usize }
    });
    if addr == 0 {
        return None;
    }
    // SAFETY: the C library's fsync and fdatasync have exactly this signature.
    Some(unsafe { std::mem::transmute::<usize, FlushFn>(addr) })
}

fn flush(fd: c_int, name: &'static [u8], slot: &'static OnceLock<usize>) -> c_int {
    let start = Instant::now();
    let rc = match next(name, slot) {
        // SAFETY: forwarding the caller's arguments to the function it meant to call.
        Some(f) => unsafe { f(fd) },
        None => {
            // SAFETY: errno is thread-local and always writable.
            unsafe { *libc::__errno_location() = libc::ENOSYS };
            return -1;
        }
    };
    // Keep the real call's errno across the sleep (nanosleep may set it on EINTR).
    // SAFETY: as above.
    let errno = unsafe { *libc::__errno_location() };
    if let Some(rest) = latency().checked_sub(start.elapsed()) {
        std::thread::sleep(rest);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
    rc
}

/// `fsync(2)` that takes at least the configured latency.
#[no_mangle]
pub extern "C" fn fsync(fd: c_int) -> c_int {
    static NEXT: OnceLock<usize> = OnceLock::new();
    flush(fd, b"fsync\0", &NEXT)
}

/// `fdatasync(2)` that takes at least the configured latency.
#[no_mangle]
pub extern "C" fn fdatasync(fd: c_int) -> c_int {
    static NEXT: OnceLock<usize> = OnceLock::new();
    flush(fd, b"fdatasync\0", &NEXT)
}
