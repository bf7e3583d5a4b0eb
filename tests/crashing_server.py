"""The server, dying like `kill -9` right after one compaction step: the step named by
OFFLOADMQ_CRASH_AT. The crash tests run this instead of offloadmq.py, so the server
itself carries no test hook."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import offloadmq  # noqa: E402

CRASH_AT = os.environ["OFFLOADMQ_CRASH_AT"]


def die_at_step(journal, step):
    if step == CRASH_AT:
        os._exit(99)


offloadmq.Journal.step_done = die_at_step
offloadmq.main()
