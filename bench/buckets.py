#!/usr/bin/env python3
"""File buckets: one large upload and its download against a real server, with the
server's RSS sampled throughout, and the disk's own ceiling as the baseline.

    .venv/bin/python bench/buckets.py [--mb 200] [--data DIR]

Baseline: this process writing the same bytes into the same folder and fsyncing them
(what the disk allows). Prints throughput both ways, the ratio to the baseline, and how
far the server's RSS rose above idle (the upload is streamed; it must not hold the file).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HOST, PY, ROOT, Proc, free_port, http_ok, rss_bytes, wait_for  # noqa: E402

MB = 1 << 20


def blocks(count: int):
    block = os.urandom(MB)
    for n in range(count):
        yield block[n % MB:] + block[:n % MB]


def baseline(folder: Path, count: int) -> float:
    path = folder / "baseline.bin"
    started = time.perf_counter()
    with open(path, "wb") as out:
        for piece in blocks(count):
            hashlib.sha256(piece)  # the server hashes as it writes: so does the baseline
            out.write(piece)
        out.flush()
        os.fsync(out.fileno())
    took = time.perf_counter() - started
    path.unlink()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--data", type=Path, help="parent of the server's data folder (default: a temp folder)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-buckets-", dir=args.data))
    port, key = free_port(), "ck-" + secrets.token_hex(12)
    server = Proc("server", [PY, str(ROOT / "offloadmq.py"), "--host", HOST, "--port", str(port),
                             "--data", str(folder / "data")], folder,
                  env={"CLIENT_API_KEYS": key, "AGENT_API_KEYS": "ak-" + secrets.token_hex(12),
                       "MGMT_TOKEN": "mt-" + secrets.token_hex(12)})
    try:
        wait_for(lambda: http_ok(f"http://{HOST}:{port}/health"), 15, "server start", server)
        conn = HTTPConnection(HOST, port, timeout=600)
        conn.request("POST", "/api/storage/bucket/create", body=b"{}",
                     headers={"X-API-Key": key, "Content-Type": "application/json"})
        bucket = json.loads(conn.getresponse().read())["bucket_uid"]
        idle = rss_bytes(server.pid)
        peak, done = [idle], threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                peak[0] = max(peak[0], rss_bytes(server.pid))
        sampler = threading.Thread(target=sample)
        sampler.start()
        head = (b'--b0\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n")
        tail = b"\r\n--b0--\r\n"
        started = time.perf_counter()
        conn.putrequest("POST", f"/api/storage/bucket/{bucket}/upload")
        for name, value in (("X-API-Key", key), ("Content-Type", "multipart/form-data; boundary=b0"),
                            ("Content-Length", str(len(head) + args.mb * MB + len(tail)))):
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(head)
        for piece in blocks(args.mb):
            conn.send(piece)
        conn.send(tail)
        stored = json.loads(conn.getresponse().read())
        upload_s = time.perf_counter() - started
        started = time.perf_counter()
        conn.request("GET", f"/api/storage/bucket/{bucket}/file/{stored['file_uid']}", headers={"X-API-Key": key})
        resp = conn.getresponse()
        while resp.read(MB):
            pass
        download_s = time.perf_counter() - started
        done.set()
        sampler.join()
        disk_s = baseline(folder, args.mb)
        print(f"bucket upload  {args.mb} MiB: {args.mb / upload_s:7.0f} MiB/s "
              f"({upload_s:.2f} s; baseline write+hash+fsync {args.mb / disk_s:.0f} MiB/s, "
              f"ratio {disk_s / upload_s:.2f})")
        print(f"bucket download {args.mb} MiB: {args.mb / download_s:7.0f} MiB/s ({download_s:.2f} s)")
        print(f"server RSS: idle {idle / MB:.1f} MiB, peak {peak[0] / MB:.1f} MiB "
              f"(+{(peak[0] - idle) / MB:.1f} MiB for a {args.mb} MiB file)")
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
