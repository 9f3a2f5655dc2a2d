"""The lookup service: answers product backends from the live batch, and writes what it served and
the feedback it got."""
