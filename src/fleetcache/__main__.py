"""``python -m fleetcache`` runs the command line."""

import sys

from fleetcache.cli import main

sys.exit(main())
