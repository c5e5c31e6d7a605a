//! Process-wide memory settings of a build on mimalloc (the default allocator): what keygate's
//! binary, and the load ladder's passthrough and floor built with the same allocator, set before
//! serving. Both are no-ops on the C library's allocator (`--no-default-features`).

/// Keep mimalloc's memory in small pages. mimalloc asks the kernel for transparent huge pages on
/// its arenas, so on a kernel that grants them (transparent huge pages `always` or `madvise`) every
/// 2 MiB region it touches becomes resident whole: an idle keygate held ~11 MiB more and an idle
/// SSE stream up to ~7 KiB more, for no CPU gain (paired runs, README, Load ladder). Call before
/// any worker thread starts; the flag is the whole process's. Returns why it could not be set.
pub fn keep_small_pages() -> Result<(), String> {
    #[cfg(all(feature = "mimalloc", target_os = "linux"))]
    nix::sys::prctl::set_thp_disable(true).map_err(|e| e.to_string())?;
    Ok(())
}

/// Give configuration's scratch memory back to the operating system before serving. Deriving a
/// vault key from a passphrase (scrypt) works in a 32 MiB buffer; the C library's allocator unmaps
/// a block that large as soon as it is freed, but mimalloc keeps freed memory for reuse until it
/// purges it, which an idle process never gets to: without this an idle keygate held ~34 MiB more.
pub fn release_startup_memory() {
    #[cfg(feature = "mimalloc")]
    // SAFETY: `mi_collect` takes no pointers and may be called from any thread at any time.
    unsafe {
        libmimalloc_sys::mi_collect(true)
    }
}
