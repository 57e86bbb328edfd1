"""``python -m vlmdefense`` runs the CLI."""

from vlmdefense.cli import main

main()
