"""``python -m pd_kernels <command>``: the command line lives in :mod:`pd_kernels.cli` (commands ``demo``,
``train``, ``eval``; ``--help`` lists them), the same :func:`~pd_kernels.cli.main` the console script
``pd-kernels`` runs."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
