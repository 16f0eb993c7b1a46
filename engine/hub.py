"""Whether the Hugging Face hub can be reached: asked before work that would otherwise retry for a minute."""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlparse

_SEEN: dict[str, tuple[float, bool]] = {}  # endpoint -> (when asked, answer): a form asks as often as it checks
_FOR_S = 30.0


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub (HF_ENDPOINT) within `timeout`; False at once in offline mode."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    seen = _SEEN.get(endpoint)
    if seen is not None and time.monotonic() - seen[0] < _FOR_S:
        return seen[1]
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            ok = True
    except OSError:
        ok = False
    _SEEN[endpoint] = (time.monotonic(), ok)
    return ok
