"""``python -m cryosvi ...``: the command line, as the ``cryosvi`` script (and under
``torchrun ... -m cryosvi``)."""

import sys

from cryosvi.cli.main import main

sys.exit(main())
