"""Rolling batches out: canaries, shadow batches and the online loop's reports."""
