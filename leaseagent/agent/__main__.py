import sys

from leaseagent.agent.main import main

sys.exit(main())
