"""Keeps native libraries' info lines off the user's terminal.

ScaNN's C++ code logs through absl before anything initialises absl logging, so
its info and warning lines (``I0000 00:00:... partitioner_factory_base.cc:58]
Size of sampled dataset ...``, ``W0000 ... gmm_utils.cc:1026] Could not
normalize centroid ...`` on small corpora) and absl's notice about them go
straight to file descriptor 2, past Python's ``logging`` and
``TF_CPP_MIN_LOG_LEVEL`` (which the CLI sets to hide TensorFlow's own info and
warning lines). :func:`quiet_native_info` routes fd 2 through a pipe while a
native call runs: those lines go to the ``tfdssm`` logger at debug level;
everything else (errors, Python's own output) reaches stderr unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator

logger = logging.getLogger("tfdssm")

# glog/absl info and warning lines ("I1130 20:13:52.123 ..." or "W0000 00:00:..."
# before the clock is set up) and absl's one-time notice that precedes them.
_INFO = re.compile(rb"^([IW]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before "
                   rb"absl::InitializeLog\(\) is called)")


def is_native_info(line: bytes) -> bool:
    """Whether ``line`` is a native library's info or warning line.

    >>> is_native_info(b"I0000 00:00:1796070038.07 1975 kmeans.h:90] ran in 8ms")
    True
    >>> is_native_info(b"W0000 00:00:1796074931.98 4848 gmm_utils.cc:1026] zero norm")
    True
    >>> is_native_info(b"E0000 00:00:1796070038.07 1975 x.cc:1] failed")
    False
    """
    return bool(_INFO.match(line))


@contextlib.contextmanager
def quiet_native_info() -> Iterator[None]:
    """Filters native info and warning lines out of fd 2 inside the block.

    Does nothing where fd 2 cannot be redirected (no such descriptor).
    """
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    read, write = os.pipe()
    sys.stderr.flush()
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                if is_native_info(line):
                    logger.debug("%s", line.decode("utf-8", "replace").rstrip())
                else:
                    os.write(saved, line)

    thread = threading.Thread(target=pump, name="tfdssm-native-logs", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the pump ends
        thread.join(timeout=10)
        os.close(saved)


__all__ = ["is_native_info", "quiet_native_info"]
