"""`python -m leaseagent.lab up|status|down`: see leaseagent.lab.cli."""

import sys

from leaseagent.lab.cli import main

sys.exit(main())
