"""The nightly steps, each a typed function of the settings and a logical date, and the parts only a
step uses: feedback (what ingest reads of the service's events), similar and popularity (the item
tables publish loads with a batch)."""
