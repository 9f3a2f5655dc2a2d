"""``python -m serving``: the lookup service, run from the environment (see `serving.server.main`)."""

from serving.server import main

if __name__ == "__main__":
    main()
