"""CI or full lengths of the long scenarios: LEASEAGENT_FULL=1 runs the full ones
(documented in docs/reliability.md and the README)."""

from __future__ import annotations

import os

FULL = os.environ.get("LEASEAGENT_FULL", "") not in ("", "0")
