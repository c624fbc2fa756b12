"""``python -m contrastlab`` runs the command-line tool."""

from contrastlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
