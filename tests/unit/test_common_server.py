"""common/server.py (how the lookup service and the console start) and `common.text.some` (short lists)."""

from typing import Any

import pytest

from common.server import check_keys_configured, check_listening, open_app_factory, run_server_main, server_parser
from common.text import some


class _Refused(Exception):
    pass


def test_some_lists_a_few_and_counts_the_rest() -> None:
    assert some([]) == ""
    assert some([4]) == "4"
    assert some([2, 4]) == "2 and 4"
    assert some([0, 3, 7]) == "0, 3 and 7"
    assert some([0, 3, 7, 8, 9]) == "0, 3, 7 and 2 more"
    assert some(range(1012), 2) == "0, 1 and 1,010 more"
    assert some(["no events", "3 users"], sentences=True) == "no events; 3 users"
    assert some(["a", "b", "c", "d"], 2, sentences=True) == "a; b (and 2 more)"


def test_a_role_without_keys_starts_only_with_no_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OVERNIGHT_AUTH_DISABLED", raising=False)
    check_keys_configured(("k",), False, what="key", variables="OVERNIGHT_X_KEYS", error=_Refused)
    check_keys_configured((), True, what="key", variables="OVERNIGHT_X_KEYS", error=_Refused)
    with pytest.raises(_Refused) as refused:
        check_keys_configured((), False, what="API key", variables="OVERNIGHT_X_KEYS", error=_Refused)
    assert str(refused.value) == (
        "no API key configured: set OVERNIGHT_X_KEYS (comma-separated) or start with --no-auth"
    )
    monkeypatch.setenv("OVERNIGHT_AUTH_DISABLED", "true")
    with pytest.raises(_Refused, match=r"\(OVERNIGHT_AUTH_DISABLED is ignored: only --no-auth turns"):
        check_keys_configured((), False, what="key", variables="OVERNIGHT_X_KEYS", error=_Refused)


def test_listening_checks() -> None:
    check_listening(0, 1, _Refused)
    with pytest.raises(_Refused, match="workers must be at least 1, got 0"):
        check_listening(8000, 0, _Refused)
    with pytest.raises(_Refused, match="port must be between 0 and 65535, got 70000"):
        check_listening(70000, 1, _Refused)


def test_the_open_factory_calls_the_app_factory_with_auth_off() -> None:
    def create_app(settings: Any = None, *, auth_disabled: bool = False) -> tuple[Any, bool]:
        return settings, auth_disabled

    assert open_app_factory(create_app)() == (None, True)


def test_the_command_line_of_a_role(capsys: pytest.CaptureFixture[str]) -> None:
    parser = server_parser(prog="python -m role", description="A role.", default_port=8123, no_auth_help="Open.")
    args = parser.parse_args([])
    assert (args.host, args.port, args.workers, args.no_auth) == ("127.0.0.1", 8123, 1, False)
    assert "Port (default 8123)." in parser.format_help()

    def refuse() -> None:
        raise _Refused("no key configured")

    with pytest.raises(SystemExit) as stopped:
        run_server_main("role", refuse, _Refused)
    assert stopped.value.code == 1
    assert capsys.readouterr().err == "role: error: no key configured\n"

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        run_server_main("role", interrupted, _Refused)
    assert stopped.value.code == 130
