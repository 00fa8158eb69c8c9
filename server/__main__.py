"""Entry point of ``python -m kubetune.server`` (see :mod:`kubetune.server.launcher`)."""

from __future__ import annotations

import sys

from kubetune.server.launcher import main

if __name__ == "__main__":
    sys.exit(main())
