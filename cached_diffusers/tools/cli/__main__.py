"""``python -m cached_diffusers.tools.cli``: the command line, as the ``cached-diffusers`` entry point runs it."""

import sys

from . import main

sys.exit(main())
