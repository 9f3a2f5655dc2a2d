"""The operator console: the monitoring dashboard as its own process and database role. It reads the batch side's
records through ``sql`` and the lookup service's ``/metrics`` over HTTP; it never imports ``jobs`` or ``serving``.
"""
