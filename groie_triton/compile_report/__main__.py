"""``python -m groie_triton.compile_report``: see the package docstring."""

import sys

from .cli import main

sys.exit(main())
