"""For trying overnight out and working on it: synthetic data, the demo, a local Airflow, the configuration page."""
