"""``python -m console``: the operator dashboard, run from the environment (see `console.server.main`)."""

from console.server import main

if __name__ == "__main__":
    main()
