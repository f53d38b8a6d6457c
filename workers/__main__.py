"""`python -m workers`: the same as `farm worker` (workers/main.py)."""

import sys

from workers.main import main

sys.exit(main())
