"""`python -m harness ...` (and `torchrun ... -m harness ...`): the `harness` command."""

import sys

from harness.cli import main

sys.exit(main())
