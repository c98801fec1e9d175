"""`python -m grass_cli ...`, which is what torchrun launches."""

from grass_cli.cli import main

main()
