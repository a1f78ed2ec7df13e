"""Run the lrnnx benchmark suite; a thin wrapper around :mod:`lrnnx.bench`.

    python benchmarks/run.py --quick                      # under two minutes
    python benchmarks/run.py --markdown benchmarks/RESULTS.md
    python benchmarks/run.py --ops selective_scan --models mamba

Every option of ``lrnnx bench`` is accepted (``--help`` lists them).
"""

import sys

from lrnnx.bench import main

if __name__ == "__main__":
    sys.exit(main())
