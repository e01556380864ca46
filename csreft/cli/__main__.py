"""`python -m csreft.cli ...` (as `python -m csreft`): the `csreft` command."""

from csreft.cli import main

main()
