"""Keeps native libraries' info lines off the user's terminal.

ScaNN's C++ code logs through absl before anything initialises absl logging, so
its info lines (``I0000 00:00:... partitioner_factory_base.cc:58] Size of
sampled dataset ...``) and absl's notice about them go straight to file
descriptor 2, past Python's ``logging`` and ``TF_CPP_MIN_LOG_LEVEL``.
:func:`quiet_native_info` routes fd 2 through a pipe while a native call runs:
info lines go to the ``tfdssm`` logger at debug level; everything else
(warnings, errors, Python's own output) reaches stderr unchanged.
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

# glog/absl info lines ("I1130 20:13:52.123 ..." or "I0000 00:00:..." before the
# clock is set up) and absl's one-time notice that precedes them.
_INFO = re.compile(rb"^(I\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before "
                   rb"absl::InitializeLog\(\) is called)")


def is_native_info(line: bytes) -> bool:
    """Whether ``line`` is a native library's info line.

    >>> is_native_info(b"I0000 00:00:1796070038.07 1975 kmeans.h:90] ran in 8ms")
    True
    >>> is_native_info(b"E0000 00:00:1796070038.07 1975 x.cc:1] failed")
    False
    """
    return bool(_INFO.match(line))


@contextlib.contextmanager
def quiet_native_info() -> Iterator[None]:
    """Filters native info lines out of file descriptor 2 inside the block.

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
