"""``python -m aeshield.cli``: the same command as ``aeshield``."""

from . import main

main()
