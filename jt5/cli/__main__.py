"""``python -m jt5.cli``: the ``jt5`` command."""
import sys

from jt5.cli import main

sys.exit(main())
