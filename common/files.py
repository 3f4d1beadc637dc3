"""Files the project writes: atomically (a temporary file in the same directory, renamed into place,
so a reader never sees half a file) and with the permissions of a plain `open` (0666 less the umask:
0644 under the usual 022), not mkstemp's private 0600."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable

_umask_lock = threading.Lock()


def current_umask() -> int:
    with _umask_lock:  # the only way to read it is to set it; keep the window closed to other threads
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp) for a temporary path beside `path`, then renames it to `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_gzip_text(path: str, text: str, compresslevel: int = 9) -> None:
    """`text` as UTF-8 in a gzip file whose bytes depend on the text alone (the header's timestamp is 0
    and its file name empty), written atomically: rebuilding bundled data leaves an unchanged file
    unchanged in git."""
    import gzip

    def write(tmp):
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=compresslevel,
                                                   mtime=0) as f:
            f.write(text.encode("utf-8"))

    atomic_write(path, write)
