"""What sql/contract.py names is what the schema, the service and the batch side use."""

import re
import typing

import sql
from jobs.settings import Settings
from serving.feedback import FeedbackEvent
from serving.variants import CANARY, PRODUCTION
from sql.contract import CANARY_VARIANT, FEEDBACK_EVENT_TYPES, PRODUCTION_VARIANT


def _checked_event_types() -> list[str]:
    """The event types the newest migration that constrains feedback_events.event_type allows."""
    found: list[str] = []
    for migration in sql.migrations():
        for listed in re.findall(r"CHECK\s*\(\s*event_type\s+IN\s*\(([^)]*)\)\s*\)", migration.text, re.IGNORECASE):
            found = re.findall(r"'([^']*)'", listed)
    return found


def test_the_schema_the_service_and_the_contract_know_the_same_feedback_event_types() -> None:
    assert _checked_event_types() == list(FEEDBACK_EVENT_TYPES)
    assert typing.get_args(FeedbackEvent.model_fields["type"].annotation) == FEEDBACK_EVENT_TYPES


def test_the_default_feedback_weights_name_only_known_event_types() -> None:
    default = Settings.model_fields["feedback_weights"].default
    assert default and set(default) <= set(FEEDBACK_EVENT_TYPES)


def test_the_variants_the_service_routes_are_the_ones_its_batches_query_names() -> None:
    assert (PRODUCTION, CANARY) == (PRODUCTION_VARIANT, CANARY_VARIANT) == typing.get_args(sql.contract.Variant)
    query = sql.query("serving_batches")
    assert f"SELECT '{PRODUCTION_VARIANT}' AS variant" in query and f"SELECT '{CANARY_VARIANT}'," in query
