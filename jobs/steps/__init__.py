"""The nightly steps, each a typed function of the settings and a logical date; three table builders the
steps share with evaluation (which measures the same tables): feedback_interactions (the service's feedback
events as ingest reads them), similar and popularity (the item tables publish loads with a batch); and
ranking_metrics, which train's promotion gate, shadow reports and evaluation score lists with."""
