"""``python -m pipeline_tasks.orchestration COMMAND``: the node driver."""

import sys

from pipeline_tasks.orchestration.driver import main

sys.exit(main())
