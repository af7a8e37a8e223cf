//! Copying bytes out of another process's memory (`process_vm_readv`), for same-host transfers
//! of large request arguments: the receiver copies straight from the sender's buffer into its
//! own, one copy and no intermediate file (see `docs/decisions/0007-reading-peer-memory.md`).

use std::io;

/// Largest piece asked of one `process_vm_readv` call (the kernel may return less; a smaller
/// piece also bounds how long one call runs without looking at signals).
const PIECE: usize = 256 << 20;

/// Run `call(local_offset, remote_address, len)` over `[0, total)` in pieces until every byte
/// moved: `call` returns what one `process_vm_*` call returned (bytes moved, or -1 with errno).
fn in_pieces(
    addr: u64,
    total: usize,
    mut call: impl FnMut(usize, u64, usize) -> isize,
) -> io::Result<()> {
    let mut done = 0usize;
    while done < total {
        let want = (total - done).min(PIECE);
        let start = addr
            .checked_add(done as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        let n = call(done, start, want);
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        done += n as usize;
    }
    Ok(())
}

fn remote_iovec(start: u64, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: start as usize as *mut libc::c_void,
        iov_len: len,
    }
}

/// Copy `dst.len()` bytes starting at address `addr` of process `pid` into `dst`.
///
/// # Errors
///
/// The OS error of the first failing call: `ESRCH` (no such process), `EPERM` (not allowed to
/// read that process: another user, or a ptrace policy), `EFAULT` (the range is not mapped in
/// that process). A call that copies nothing while bytes remain reports `EFAULT`. `EINTR` is
/// retried.
pub fn read_process_memory(pid: i32, addr: u64, dst: &mut [u8]) -> io::Result<()> {
    let base = dst.as_mut_ptr();
    in_pieces(addr, dst.len(), |done, start, want| {
        let local = libc::iovec {
            // SAFETY: `done + want <= dst.len()`: the pointer stays inside `dst`.
            iov_base: unsafe { base.add(done) }.cast(),
            iov_len: want,
        };
        let remote = remote_iovec(start, want);
        // SAFETY: `local` describes `want` writable bytes inside `dst`, which we borrow
        // mutably for the whole call; `remote` is only an address in the other process: the
        // kernel checks it and fails with EFAULT instead of touching our memory.
        unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) }
    })
}

/// Reads below this many bytes run on the calling thread alone.
pub const PARALLEL_MIN: usize = 8 << 20;
/// Least share of a read one thread takes (smaller shares cost more in thread start-up than
/// they save).
const PARALLEL_SHARE: usize = 4 << 20;
const PAGE: usize = 4096;

/// Threads worth using for a read of `len` bytes, at most `limit`: 1 below [`PARALLEL_MIN`],
/// else one per [`PARALLEL_SHARE`] up to `limit`.
pub fn read_threads(len: usize, limit: usize) -> usize {
    if len < PARALLEL_MIN {
        return 1;
    }
    limit.min(len / PARALLEL_SHARE).max(1)
}

/// [`read_process_memory`] split into page-aligned shares copied by `threads` threads at once
/// (the calling thread takes the first share). Into freshly allocated memory one thread copies
/// at about 60% of `memcpy`'s speed (the kernel faults the destination in 4 KiB steps while it
/// holds the source pages pinned); two threads on two cores bring it level with `memcpy`.
///
/// # Errors
///
/// As [`read_process_memory`]: the error of the first share that failed.
pub fn read_process_memory_parallel(
    pid: i32,
    addr: u64,
    dst: &mut [u8],
    threads: usize,
) -> io::Result<()> {
    let n = threads.max(1);
    if n == 1 || dst.is_empty() {
        return read_process_memory(pid, addr, dst);
    }
    let share = dst.len().div_ceil(n).div_ceil(PAGE) * PAGE;
    let mut parts: Vec<(u64, &mut [u8])> = Vec::with_capacity(n);
    let mut offset = 0u64;
    for part in dst.chunks_mut(share) {
        let start = addr
            .checked_add(offset)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        offset += part.len() as u64;
        parts.push((start, part));
    }
    let mut parts = parts.into_iter();
    let Some((first_addr, first)) = parts.next() else {
        return Ok(());
    };
    std::thread::scope(|scope| {
        let helpers: Vec<_> = parts
            .map(|(start, part)| scope.spawn(move || read_process_memory(pid, start, part)))
            .collect();
        let mut result = read_process_memory(pid, first_addr, first);
        for helper in helpers {
            let r = helper
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a copying thread panicked")));
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

/// Copy `src` to address `addr` of process `pid` (`process_vm_writev`): how a receiver tells
/// the sender, through a word the sender watches, that it has its copy.
///
/// # Errors
///
/// As [`read_process_memory`].
pub fn write_process_memory(pid: i32, addr: u64, src: &[u8]) -> io::Result<()> {
    in_pieces(addr, src.len(), |done, start, want| {
        let local = libc::iovec {
            iov_base: src[done..].as_ptr() as *mut libc::c_void,
            iov_len: want,
        };
        let remote = remote_iovec(start, want);
        // SAFETY: `local` describes `want` readable bytes of `src` (the kernel only reads
        // them); `remote` is checked by the kernel, which fails with EFAULT for a bad range.
        unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_exactly() {
        let src: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        let pid = std::process::id() as i32;
        read_process_memory(pid, src.as_ptr() as u64, &mut dst).expect("read own memory");
        assert_eq!(src, dst);
    }

    #[test]
    fn parallel_reads_are_exact_for_any_split() {
        let src: Vec<u8> = (0..(3 << 20) + 12_345u32)
            .map(|i| (i % 253) as u8)
            .collect();
        let pid = std::process::id() as i32;
        for threads in [1, 2, 3, 4, 7] {
            let mut dst = vec![0u8; src.len()];
            read_process_memory_parallel(pid, src.as_ptr() as u64, &mut dst, threads)
                .expect("read own memory");
            assert!(src == dst, "{threads} threads");
        }
        let mut dst = vec![0u8; 1 << 20];
        let err = read_process_memory_parallel(pid, 8, &mut dst, 4).expect_err("unmapped");
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
        read_process_memory_parallel(pid, 0, &mut [], 4).expect("nothing to read");
        assert_eq!(read_threads(PARALLEL_MIN - 1, 8), 1);
        assert_eq!(read_threads(PARALLEL_MIN, 8), 2);
        assert_eq!(read_threads(1 << 30, 2), 2);
        assert_eq!(read_threads(1 << 30, 0), 1);
    }

    #[test]
    fn empty_read_is_ok_and_bad_ranges_fail() {
        let pid = std::process::id() as i32;
        read_process_memory(pid, 0, &mut []).expect("nothing to read");
        let mut dst = [0u8; 16];
        let err = read_process_memory(pid, 8, &mut dst).expect_err("address 8 is not mapped");
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
        let err = read_process_memory(pid, u64::MAX - 4, &mut dst).expect_err("wraps around");
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
    }

    #[test]
    fn writes_own_memory_exactly() {
        let mut word = vec![0u8; 8];
        let pid = std::process::id() as i32;
        let addr = word.as_mut_ptr() as u64;
        write_process_memory(pid, addr, &7u64.to_ne_bytes()).expect("write own memory");
        assert_eq!(
            u64::from_ne_bytes(word[..8].try_into().expect("8 bytes")),
            7
        );
        let err = write_process_memory(pid, 8, &[1]).expect_err("address 8 is not mapped");
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
    }

    #[test]
    fn a_missing_process_is_esrch() {
        let mut dst = [0u8; 4];
        // pid_max is at most 2^22 on Linux: this pid cannot exist.
        let err = read_process_memory(i32::MAX, 4096, &mut dst).expect_err("no such process");
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }
}
