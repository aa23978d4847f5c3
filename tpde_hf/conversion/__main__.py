"""``python -m tpde_hf.conversion`` = the ``tpde`` command."""

import sys

from tpde_hf.conversion.cli import main

sys.exit(main())
