"""`python -m workers`: the same as `farm worker`."""

import sys

from workers.main import main

sys.exit(main())
