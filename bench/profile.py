"""py-spy helpers: record a running process to collapsed stacks ("raw" format), and
summarise them as self and inclusive time per function.

    python -m bench.profile summarize FILE.txt [--top 25] [--only offloadmq.py]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

from bench.common import Proc


def start(pid: int, out: Path, name: str, log_dir: Path, rate: int = 250) -> Proc | None:
    exe = shutil.which("py-spy") or str(Path(os.sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return None
    return Proc(f"py-spy-{name}", [exe, "record", "--pid", str(pid), "--rate", str(rate),
                                    "--format", "raw", "--output", str(out), "--nonblocking"],
                log_dir)


def stop(proc: Proc | None) -> None:
    """py-spy writes its file on SIGINT."""
    if proc is None or not proc.alive():
        return
    os.kill(proc.pid, signal.SIGINT)
    try:
        proc.popen.wait(30)
    except subprocess.TimeoutExpired:
        proc.stop()
    proc.log.close()


FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")


def summarize(path: Path, top: int = 25, only: str | None = None) -> str:
    self_t: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():  # py-spy can print a frame's text undecoded
            continue
        n = int(count)
        total += n
        frames = []
        for f in stack.split(";"):
            m = FRAME.match(f)
            frames.append(f"{m['func']} ({Path(m['file']).name}:{m['line']})" if m and m["line"]
                          else (f"{m['func']} ({Path(m['file']).name})" if m else f))
        self_t[frames[-1]] += n
        for f in set(re.sub(r":\d+\)$", ")", f) for f in frames):
            incl[f] += n
    out = [f"{path.name}: {total} samples"]

    def keep(name: str) -> bool:
        return only is None or only in name
    out.append("  self time:")
    for name, n in [x for x in self_t.most_common() if keep(x[0])][:top]:
        out.append(f"    {100 * n / total:5.1f}%  {name}")
    out.append("  inclusive time:")
    for name, n in [x for x in incl.most_common() if keep(x[0])][:top]:
        out.append(f"    {100 * n / total:5.1f}%  {name}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=("summarize",))
    p.add_argument("file")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--only")
    args = p.parse_args()
    print(summarize(Path(args.file), args.top, args.only))


if __name__ == "__main__":
    main()
