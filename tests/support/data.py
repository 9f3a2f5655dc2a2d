"""The dates and datasets the tests run on."""

from datetime import date, timedelta
from pathlib import Path

SAMPLE_DATE = date(2026, 11, 20)  # the generated sample's last day
PREVIOUS_DATE = SAMPLE_DATE - timedelta(days=1)
MOVIELENS_100K = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-100k"
