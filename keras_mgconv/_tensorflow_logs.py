"""TensorFlow's C++ log lines that the package itself causes, and hides.

TensorFlow's C++ side logs to file descriptor 2 directly, past Python's
`sys.stderr`, and some of its lines come before it reads TF_CPP_MIN_LOG_LEVEL
(the start-up lines of its shared libraries). `hidden` captures that
descriptor while a block runs and then writes back every line but those a
test picks out, so that nothing else is lost: the package uses it only around
what it does itself (the `keras-mgconv` command's import of TensorFlow, the
gradient probe's expected failures, its own device listing).

This module imports nothing from TensorFlow: the command line uses it before
TensorFlow is loaded.
"""

import contextlib
import os
import re
import sys
import tempfile
import threading

# "I0000 00:00:1796235133.670625    4717 port.cc:153] ...": TensorFlow's (absl's)
# log prefix: severity, date, time, thread, file and line.
_RECORD = re.compile(r"(?P<severity>[IWEF])\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")

# absl writes this once per library before its logging is initialised.
_ABSL_HEADER = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
)

# One capture at a time: descriptor 2 belongs to the whole process.
_LOCK = threading.RLock()


def startup_line(record):
    """TensorFlow's start-up chatter, for a command that chose TF_CPP_MIN_LOG_LEVEL=2.

    absl's header and the info and warning records that TensorFlow's libraries
    log as they load, before they read the level ("Could not find cuda
    drivers", "oneDNN custom operations are on").
    """
    match = _RECORD.match(record)
    return record.startswith(_ABSL_HEADER) or bool(match and match["severity"] in "IW")


def records_saying(*phrases):
    """A test for `hidden`: the records that contain one of `phrases`."""

    def test(record):
        return bool(_RECORD.match(record)) and any(phrase in record for phrase in phrases)

    return test


def _records(text):
    """`text` cut into records: a log line with the indented lines that continue it."""
    records = []
    for line in text.splitlines(keepends=True):
        if records and line[:1] in (" ", "\t") and _RECORD.match(records[-1]):
            records[-1] += line
        else:
            records.append(line)
    return records


@contextlib.contextmanager
def hidden(drop):
    """Runs the block with descriptor 2 captured, then writes back the records `drop` refuses.

    Args:
        drop: a function of one record (a line, with its indented
            continuation lines) that is True for the records to leave out.
    """
    with _LOCK:
        try:
            sys.stderr.flush()
            original = os.dup(2)
        except (OSError, ValueError, AttributeError):
            # No descriptor 2 to capture (closed, or a stream without one).
            yield
            return
        try:
            with tempfile.TemporaryFile() as captured:
                os.dup2(captured.fileno(), 2)
                try:
                    yield
                finally:
                    with contextlib.suppress(OSError, ValueError, AttributeError):
                        sys.stderr.flush()
                    os.dup2(original, 2)
                    captured.seek(0)
                    text = captured.read().decode(errors="replace")
                    kept = "".join(record for record in _records(text) if not drop(record))
                    _write(original, kept.encode())
        finally:
            os.close(original)


def _write(descriptor, data):
    while data:
        data = data[os.write(descriptor, data) :]
