"""``python -m cli``: the ``pagedgen`` command."""

import sys

from cli.main import main

sys.exit(main())
