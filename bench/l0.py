"""L0 ceiling: start bench/l0_app.py on a free port and load it with Debian's wrk."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from bench.common import HOST, PY, Proc, free_port, port_open, wait_for

HERE = Path(__file__).resolve().parent


def run_l0(tmp: Path, threads: int = 2, connections: int = 64, duration_s: int = 5) -> dict:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk not found (apt-get install -y wrk)")
    port = free_port()
    app = Proc("l0-app", [PY, "-m", "bench.l0_app", str(port)], tmp)
    try:
        wait_for(lambda: port_open(port), 20, "the L0 app", app)
        out = subprocess.run([wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s",
                              "-s", str(HERE / "l0_post.lua"), f"http://{HOST}:{port}/echo"],
                             capture_output=True, text=True, timeout=duration_s + 30).stdout
    finally:
        app.stop()
    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    lat = re.search(r"Latency\s+([\d.]+\w+)", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    if rps is None:
        raise RuntimeError(f"could not read wrk output:\n{out}")
    return {"req_per_s": float(rps.group(1)), "latency_avg": lat.group(1) if lat else None,
            "non_2xx": int(errors.group(1)) if errors else 0,
            "setup": f"wrk -t{threads} -c{connections} -d{duration_s}s keep-alive"}
