"""``python -m pipeline_tasks STAGE``: see :mod:`pipeline_tasks.cli`."""

import sys

from pipeline_tasks.cli import main

sys.exit(main())
