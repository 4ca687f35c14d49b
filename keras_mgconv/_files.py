"""Writing files so that a failure never leaves a half-written one behind."""

import os


def atomic_write(path, write):
    """Calls `write(temporary)` and renames the temporary file to `path`.

    The temporary file is in `path`'s directory (so the rename is atomic) and
    has its extension (Keras saves only to names that end in ".keras"). It is
    removed if `write` raises: `path` is either the old file or the new one.
    """
    directory, name = os.path.split(path)
    stem, extension = os.path.splitext(name)
    temporary = os.path.join(directory, f".{stem}.{os.getpid()}.tmp{extension}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
