"""`python -m meanwise`: the same as the `meanwise` command."""

import sys

from meanwise.cli import main

sys.exit(main())
