"""`python -m popek`: the popek command line."""

from popek.cli import main

main()
