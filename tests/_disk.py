"""A full disk where monkeypatching cannot reach (GDAL's and other C code's writes)."""
import contextlib
import resource
import signal


@contextlib.contextmanager
def file_size_limit(num_bytes):
    """Writes past `num_bytes` fail with EFBIG in this process and its children, as on a full disk
    (SIGXFSZ ignored, so the write fails instead of the process dying)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (num_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
