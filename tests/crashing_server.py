"""The server, dying like `kill -9` right after one compaction step: the step named by
OFFLOADMQ_CRASH_AT. The crash tests run this instead of offloadmq.py, so the server
itself carries no test hook. A step of the forked snapshot writer takes the server down
with it, as a power loss would (the server alone goes on after a writer that fails)."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import offloadmq  # noqa: E402

CRASH_AT = os.environ["OFFLOADMQ_CRASH_AT"]
SERVER_PID = os.getpid()


def die_at_step(journal, step):
    if step == CRASH_AT:
        if os.getpid() != SERVER_PID:  # in the snapshot writer
            os.kill(SERVER_PID, signal.SIGKILL)
        os._exit(99)


offloadmq.Journal.step_done = die_at_step
offloadmq.main()
