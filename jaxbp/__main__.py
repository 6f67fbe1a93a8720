"""``python -m jaxbp``: the ``jaxbp`` command (as ``python -m jaxbp.cli``)."""

import sys

from jaxbp.cli import main

sys.exit(main())
