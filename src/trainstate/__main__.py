"""``python -m trainstate``: the command line (see `trainstate.cli`)."""

from __future__ import annotations

from trainstate.cli import main

if __name__ == "__main__":
    main()
