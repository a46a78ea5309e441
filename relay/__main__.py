"""`python -m relay`: the same entry point as the `oauth-relay` console script."""

import sys

from relay.cli import main

sys.exit(main())
