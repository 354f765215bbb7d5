"""``python -m pydotcompute`` runs the command line."""

import sys

from pydotcompute.cli.main import main

sys.exit(main())
