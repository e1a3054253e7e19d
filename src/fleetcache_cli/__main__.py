"""``python -m fleetcache_cli`` runs the command line (as the ``fleetcache`` script does)."""

import sys

from fleetcache_cli import main

sys.exit(main())
