"""Writing files so that a failure never leaves a half-written one behind, and
keeping two processes from writing into one directory at once."""

import contextlib
import fcntl
import os
import re

# The name `atomic_write` gives its temporary file: ".STEM.PID.tmp.EXT".
_TEMPORARY = re.compile(r"\.(?P<stem>.+)\.(?P<pid>\d+)\.tmp(?P<extension>\.[^.]*)?")


def atomic_write(path, write):
    """Calls `write(temporary)` and renames the temporary file to `path`.

    The temporary file is in `path`'s directory (so the rename is atomic) and
    has its extension (Keras saves only to names that end in ".keras"). It is
    removed if `write` raises: `path` is either the old file or the new one. A
    killed process leaves it behind: the next `atomic_write` of `path`, or
    `remove_stale_temporaries`, removes it.
    """
    directory, name = os.path.split(path)
    stem, extension = os.path.splitext(name)
    remove_stale_temporaries(directory or ".", name)
    temporary = os.path.join(directory, f".{stem}.{os.getpid()}.tmp{extension}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory, name=None):
    """Removes the temporary files of `atomic_write`s whose process has died.

    Args:
        directory: where to look.
        name: only those of the file `name`; None: all.

    Returns:
        The names removed.
    """
    removed = []
    for candidate in sorted(os.listdir(directory)):
        match = _TEMPORARY.fullmatch(candidate)
        if (
            match
            and name in (None, match["stem"] + (match["extension"] or ""))
            and not _is_running(int(match["pid"]))
        ):
            os.remove(os.path.join(directory, candidate))
            removed.append(candidate)
    return removed


class DirectoryLockedError(Exception):
    """Another process holds the lock; `pid` is its id, None if not yet written."""

    def __init__(self, directory, pid):
        super().__init__(f"{directory} is locked by process {pid}")
        self.directory = directory
        self.pid = pid


def _read_pid(fd):
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except ValueError:
        return None


@contextlib.contextmanager
def directory_lock(directory, name=".lock"):
    """Holds an exclusive lock on `directory` (created if missing) while the context runs.

    The lock is an `fcntl.flock` on the file `name` in `directory`, which holds
    the owner's process id. The kernel releases it when the process dies, however
    it dies, so a killed run never blocks the next one. On exit the lock file is
    removed, and so are the directories the lock created if they are still empty:
    a run refused after taking the lock leaves nothing behind.

    Raises:
        DirectoryLockedError: another process (or another `directory_lock` in
            this one) holds the lock.
    """
    missing = []
    parent = os.path.abspath(directory)
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    try:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise DirectoryLockedError(directory, pid) from None
            # The owner before us removes the file before it unlocks it: if we
            # locked a removed file, lock the file that is there now instead.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            # The directory may have been removed, or made unwritable, meanwhile;
            # a lock file left behind blocks nobody once its descriptor is closed.
            with contextlib.suppress(OSError):
                os.remove(path)
            os.close(fd)
    finally:
        for created in missing:
            try:
                os.rmdir(created)
            except OSError:
                break
