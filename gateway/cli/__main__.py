"""python -m sluice.gateway.cli"""

import sys

from sluice.gateway.cli import main

sys.exit(main())
