"""``python -m pancreas_cli``."""

from pancreas_cli.cli import main

if __name__ == "__main__":
    main()
