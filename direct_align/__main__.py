"""`python -m direct_align` is the `direct-align` command."""

from direct_align.cli import main

main()
