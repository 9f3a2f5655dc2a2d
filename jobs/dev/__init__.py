"""For trying overnight out: synthetic data and a local Airflow."""
