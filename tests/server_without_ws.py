"""The server as it was before the agent WebSocket: `/private/agent/ws` answers 404 like
any unknown path. The agent's fallback test runs this instead of offloadmq.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import offloadmq  # noqa: E402

offloadmq.ROUTES[:] = [r for r in offloadmq.ROUTES if r[1] != "/private/agent/ws"]
offloadmq.main()
