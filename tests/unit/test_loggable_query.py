"""What the access logs write of a query string: the values of the parameters the app reads, every other
value REDACTED (a credential may come under any name), whole to the next `&` as the apps read it."""

from typing import Any

from fastapi.dependencies.utils import get_flat_dependant
from fastapi.routing import APIRoute

from common.web import bounded, loggable_query
from console.access_log import LOGGED_QUERY_PARAMETERS as CONSOLE_PARAMETERS
from console.app import create_app as create_console
from console.settings import get_console_settings
from serving.app import create_app as create_service
from serving.metrics import LOGGED_QUERY_PARAMETERS as SERVICE_PARAMETERS
from serving.settings import get_serving_settings

SECRET = "s3cret-credential"


def test_credentials_under_any_name_are_redacted() -> None:
    names = ("api-key", "x-api-key", "auth", "sig", "session", "code", "key", "KEY", "token", "k%65y")
    query = "&".join(f"{name}={SECRET}" for name in names).encode()
    logged = loggable_query(query, SERVICE_PARAMETERS)
    assert SECRET not in logged
    assert logged == "&".join(f"{name}=REDACTED" for name in names)


def test_a_value_is_what_the_app_reads_up_to_the_next_ampersand() -> None:
    """The apps split at `&` only (a `;` is part of a value): a parameter the app does not read is redacted
    whole, `;` and all; inside one it reads, a `;name=` piece naming another parameter is redacted too, in
    case a proxy in front splits there."""
    assert loggable_query(f"a=1;key={SECRET}".encode(), SERVICE_PARAMETERS) == "a=REDACTED"
    assert loggable_query(f"token=abc;k={SECRET}&k=3".encode(), SERVICE_PARAMETERS) == "token=REDACTED&k=3"
    assert loggable_query(f"date=2026-11-20;key={SECRET}".encode(), CONSOLE_PARAMETERS) == (
        "date=2026-11-20;key=REDACTED"
    )
    mixed = f"k=3;sig={SECRET}&exclude=i1;code={SECRET}".encode()
    assert loggable_query(mixed, SERVICE_PARAMETERS) == "k=3;sig=REDACTED&exclude=i1;code=REDACTED"
    assert loggable_query(b"exclude=item;1&segment=a;k=2", SERVICE_PARAMETERS) == "exclude=item;1&segment=a;k=2"


def test_the_apps_own_parameters_are_written_as_sent() -> None:
    query = b"k=3&exclude=i1%2Ci2&exclude=i9&filter=genre%3ADrama&segment=web&user_id=42&explain"
    assert loggable_query(query, SERVICE_PARAMETERS) == query.decode()
    assert loggable_query(b"%6B=3", SERVICE_PARAMETERS) == "%6B=3"  # the app reads it as k
    assert loggable_query(b"K=3&exclude", SERVICE_PARAMETERS) == "K=REDACTED&exclude"  # names are exact
    assert loggable_query(b"", SERVICE_PARAMETERS) == ""
    assert loggable_query(b"k=3&&;date=x", SERVICE_PARAMETERS) == "k=3&&;date=REDACTED"  # name ";date"


def test_a_part_without_a_value_is_redacted_whole_unless_the_app_reads_it() -> None:
    # `?<token>` alone: no name to keep, it may be the secret itself
    assert loggable_query(SECRET.encode(), SERVICE_PARAMETERS) == "REDACTED"
    assert loggable_query(f"explain&{SECRET}".encode(), SERVICE_PARAMETERS) == "explain&REDACTED"


def test_a_long_query_is_still_bounded() -> None:
    logged = bounded(loggable_query(b"&".join([b"k=" + b"9" * 100] * 100), SERVICE_PARAMETERS))
    assert len(logged) < 600 and logged.endswith("more characters]")


def _query_parameters(app: Any) -> set[str]:
    return {
        parameter.alias
        for route in app.routes
        if isinstance(route, APIRoute)
        for parameter in get_flat_dependant(route.dependant).query_params
    }


def test_each_app_logs_the_values_of_its_own_query_parameters_and_no_others() -> None:
    """The allowlists follow the routes: a parameter the app reads is written (useful), and the one it
    reads to refuse (the console's `key`, a secret in the address) is not."""
    service = create_service(get_serving_settings(database_url="postgresql://db/overnight", api_keys=("k" * 16,)))
    documented = {
        parameter["name"]
        for operations in service.openapi()["paths"].values()
        for operation in operations.values()
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "query"
    }
    assert documented == SERVICE_PARAMETERS
    console = create_console(get_console_settings(database_url="postgresql://db/overnight", api_keys=("k" * 16,)))
    assert _query_parameters(console) - {"key"} == CONSOLE_PARAMETERS
