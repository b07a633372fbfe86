"""``python -m service``: the ``pagedgen`` command."""

import sys

from service.cli import main

sys.exit(main())
