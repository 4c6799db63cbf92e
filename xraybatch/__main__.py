"""``python -m xraybatch``."""

from xraybatch.cli import main

main()
