"""glibc malloc's settings for a training process on the CPU (no torch import: the reference benchmark,
scripts/benchmark_reference_train.py, loads this file alone to give the reference's step the same ones)."""

_ALLOCATOR_TUNED = None


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process (glibc malloc) instead of returning it to the OS at once.

    A training step allocates and frees several [tokens, vocabulary] buffers (100+ MB each). glibc serves
    blocks that large with fresh mmap()s, so every step the kernel zero-fills every page again (tens of ms
    per buffer). With mmap off and a high trim threshold freed blocks are reused; the price is that the
    process keeps its peak heap. Returns whether the settings took (glibc only; elsewhere nothing changes).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED is not None:
        return _ALLOCATOR_TUNED
    _ALLOCATOR_TUNED = False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    _ALLOCATOR_TUNED = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))
    return _ALLOCATOR_TUNED
