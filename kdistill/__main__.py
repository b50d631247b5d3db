"""`python -m kdistill ...`, the form torchrun and `--nproc` start: the same as the `kdistill` command."""

import sys

from kdistill.cli import main

sys.exit(main())
