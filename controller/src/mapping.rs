//! A BPF array created with `BPF_F_MMAPABLE`, mapped shared into this process: the controller
//! reads and writes its values in place, with the same atomic instructions the programs use
//! (`VERSE_CT_OWNERS`' counters, `Config::epoch`), where the `bpf(2)` update of a whole value
//! would copy it in pieces of whatever size the kernel's `memcpy` picks.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// `slots` values of `T`, mapped shared.
pub struct Mapped<T> {
    ptr: NonNull<T>,
    slots: u32,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory; the owners of a `Mapped` access it only through
// atomic operations (see the users); it lives until `Drop`, which needs `&mut self`.
unsafe impl<T> Send for Mapped<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Mapped<T> {}

impl<T> std::fmt::Debug for Mapped<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapped").field("slots", &self.slots).finish_non_exhaustive()
    }
}

impl<T> Mapped<T> {
    /// Maps the array behind `fd` (created with `BPF_F_MMAPABLE`, `slots` values of `T`).
    pub fn map(fd: BorrowedFd<'_>, slots: u32) -> io::Result<Mapped<T>> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::Error::other("sysconf(_SC_PAGESIZE) failed"))?;
        let len = std::mem::size_of::<T>() * slots as usize;
        let bytes = len.div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of a BPF array the kernel allows to be mapped; `bytes`
        // does not exceed the array's size rounded up to pages, as `bpf_map_mmap` requires.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<T>()).ok_or_else(|| io::Error::other("mmap"))?;
        Ok(Mapped { ptr, slots, bytes })
    }

    /// The number of values.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// The byte at `offset` of value `slot`, or `None` beyond the array. The caller reads and
    /// writes what is there only atomically, at an offset aligned for its width, and not
    /// beyond `self`'s life.
    pub fn field(&self, slot: u32, offset: usize) -> Option<*mut u8> {
        if slot >= self.slots || offset >= std::mem::size_of::<T>() {
            return None;
        }
        // SAFETY: `slot` and `offset` are within the mapping (checked above); the array's
        // values are laid out as `T`s, back to back (the kernel rounds BPF array values up to 8
        // bytes: the users' `T`s are multiples of 8).
        Some(unsafe { self.ptr.as_ptr().add(slot as usize).cast::<u8>().add(offset) })
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `Mapped::map` with this address and length, and no
        // reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}
