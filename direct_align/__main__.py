"""`python -m direct_align` is the `direct-align` command."""

from direct_align.cli import main

if __name__ == "__main__":  # not when a fork server imports it
    main()
