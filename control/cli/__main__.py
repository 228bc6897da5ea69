"""`python -m control.cli` = `triton-hybrid` (the local stack starts the daemon this way)."""
from control.cli import main

main()
