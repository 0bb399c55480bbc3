"""Peak memory (RSS) of training, index building and serving, each in a fresh
process so one phase's peak does not hide another's.

* training: ``tfdssm train --pipeline movielens`` (1 epoch; 100k ratings) —
  includes the exports (towers, retrieval, TFLite);
* index build: a ScaNN retrieval module over N random 128-d candidates;
* serving: ``tfdssm serve`` on the MovieLens export after 200 REST requests.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from benchmarks import common

PYTHON = sys.executable
BIN = pathlib.Path(sys.executable).parent


def _peak(code: str) -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child
    # of a large benchmark process would report its parent's peak.
    script = code + (
        "\nfor line in open('/proc/self/status'):\n"
        "    if line.startswith('VmHWM:'):\n"
        "        print('PEAK', int(line.split()[1]) / 1024)\n")
    out = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True,
                         check=True, timeout=1800).stdout
    return float(out.split("PEAK")[-1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serving_peak(export_dir: str) -> float:
    grpc_port, rest_port = _free_port(), _free_port()
    server = subprocess.Popen(
        [str(BIN / "tfdssm"), "serve", "--export-dir", export_dir, "--grpc-port",
         str(grpc_port), "--rest-port", str(rest_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{rest_port}/v1/models/retrieval_brute_force:predict"
        body = json.dumps({"instances": [{"user_id": "42", "age": 30.0,
                                          "gender": "M", "occupation": "writer",
                                          "zip_prefix": "55"}]}).encode()
        deadline = time.time() + 300
        done = 0
        while done < 200 and time.time() < deadline:
            try:
                request = urllib.request.Request(url, body, method="POST")
                urllib.request.urlopen(request, timeout=10).read()
                done += 1
            except OSError:
                time.sleep(0.5)
        with open(f"/proc/{server.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def run(quick: bool = False) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = os.path.join(tmp, "ml")
        train = _peak(
            "from tfdssm import cli\n"
            f"assert cli.main(['train', '--pipeline', 'movielens', '--epochs', '1', "
            f"'--quiet', '--export-dir', {export_dir!r}]) == 0")
        rows.append(["training (MovieLens-100k, 1 epoch, with exports)", train])
        for n in ((100_000,) if quick else (100_000, 1_000_000)):
            peak = _peak(
                "import tfdssm, numpy as np, tensorflow as tf\n"
                "from tfdssm import index\n"
                "x = np.random.default_rng(0).normal(\n"
                f"    size=[{n}, 128]).astype('float32')\n"
                "spec = {'q': tf.TensorSpec([None], tf.string, name='q')}\n"
                "index.ScannRetrieval(lambda f: f, spec, x,\n"
                f"                     [str(i) for i in range({n})])"
            )
            rows.append([f"ScaNN index build, {n:,} x 128 floats "
                         f"({n * 128 * 4 / 2**20:.0f} MiB of vectors)", peak])
        rows.append(["tfdssm serve (MovieLens export, 3 models) after 200 requests",
                     _serving_peak(export_dir)])
    markdown = ("### Memory: peak RSS, one fresh process per phase\n\n"
                + common.table(["phase", "peak RSS MiB"], rows))
    return {"markdown": markdown, "rows": rows}
