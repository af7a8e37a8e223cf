//! Transparent huge pages for large frames received on links (decisions 0017 and 0016,
//! amendment "huge pages for link frames").
//!
//! A link's large frame gets its own `libc::malloc` block, which glibc maps afresh for every
//! frame of many MiB; `read(2)` then faults its 4 KiB pages one by one. Advising
//! `MADV_HUGEPAGE` lets the kernel fault 2 MiB at once, as NumPy does for its own arrays of
//! 4 MiB or more. Only the advice changes: the memory stays the allocator's. (The data
//! stream's frames come from the extension's heap, which reuses already-faulted pages: the
//! advice measured no gain there, and a loss when a frame did need fresh memory.)

/// Frames at least this long are advised (NumPy's threshold).
pub(crate) const HUGE_FRAME: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// Advise `MADV_HUGEPAGE` on the 2 MiB-aligned pages inside `ptr .. ptr + len`, if `len` is
/// at least [`HUGE_FRAME`]. Failure (no THP support, a kernel that refuses) is ignored: the
/// advice is only an optimisation.
pub(crate) fn advise(ptr: *mut u8, len: usize) {
    if len < HUGE_FRAME {
        return;
    }
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize).saturating_add(len) & !(HUGE_PAGE - 1);
    if end <= start {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: `start .. end` lies inside memory the caller owns (an allocation of `len` bytes
    // at `ptr`) and is page-aligned; MADV_HUGEPAGE only sets a flag on the mapping and never
    // changes or discards its contents.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advised_frames_keep_their_bytes() {
        for len in [0, 4096, HUGE_FRAME - 1, HUGE_FRAME, 3 * HUGE_FRAME + 12345] {
            let mut v: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            advise(v.as_mut_ptr(), v.len());
            assert!(v.iter().enumerate().all(|(i, &b)| b == (i % 253) as u8));
        }
    }
}
