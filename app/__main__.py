"""`python -m app` runs the fleetmate command."""

import sys

from app.cli.main import main

sys.exit(main())
