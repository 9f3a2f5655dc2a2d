"""The batch side: the nightly steps, monitoring, rollouts and the ``overnight`` CLI."""
