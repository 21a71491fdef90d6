"""``python -m cached_diffusers``: the ``cached-diffusers`` command line, also under ``torchrun -m cached_diffusers``
(torchrun runs a Python file or, with ``-m``, a module; not a console script)."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
