"""``python -m benchmarks run --suite speed|accuracy|all [--quick] [--device cpu|gpu]
[--out DIR]``: see :mod:`benchmarks.cli`."""

import sys

from benchmarks.cli import main

sys.exit(main())
