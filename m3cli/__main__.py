"""``python -m m3cli``: the ``m3`` command line."""

from m3cli.cli import main

if __name__ == "__main__":
    main()
