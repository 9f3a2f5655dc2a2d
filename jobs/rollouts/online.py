"""Online metrics: what was served (``overnight.served_predictions``) joined to what users did with it
(``overnight.feedback_events``), per variant, batch and model (``overnight online-report``; definitions:
docs/rollouts.md#the-online-report), and the upkeep of those two tables' daily partitions.
"""

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from psycopg.rows import dict_row

import sql
from jobs import lake
from jobs.database import connect, upgrade
from jobs.errors import BadInputError
from jobs.jsonable import jsonb
from jobs.outcome import Outcome
from jobs.registry import metric_text
from jobs.settings import Settings
from sql.contract import CANARY_VARIANT, PRODUCTION_VARIANT

Z = 1.959964  # 95%
MIN_PROPENSITY = 0.05
PROPENSITY_MODELS = ("power", "estimated")
PARTITIONED_TABLES = ("served_prediction_chunks", "feedback_events")
OFFLINE_METRICS = ("ndcg@10", "recall@10", "map@10", "hit_rate@10", "coverage@10")
UNKNOWN_MODEL = "unknown"  # a logged batch id with no row in overnight.batches
# Feedback for a list served late on the last day may arrive a little after it.
FEEDBACK_GRACE = timedelta(days=1)


# ---------------------------------------------------------------------------- statistics


def wilson(successes: float, trials: float) -> dict[str, float | None]:
    """The share with its 95% Wilson score interval (sound for small counts and shares near 0).
    `trials` may be an effective sample size (not a whole number): see `clustered_wilson`."""
    if trials <= 0:
        return {"value": None, "low": None, "high": None}
    p = successes / trials
    denominator = 1 + Z * Z / trials
    centre = (p + Z * Z / (2 * trials)) / denominator
    half = Z * math.sqrt(p * (1 - p) / trials + Z * Z / (4 * trials * trials)) / denominator
    return {"value": _r(p), "low": _r(max(0.0, centre - half)), "high": _r(min(1.0, centre + half))}


def newcombe(a: dict[str, float | None], b: dict[str, float | None]) -> dict[str, float | None]:
    """a - b with Newcombe's hybrid score interval, from the two Wilson intervals."""
    if a["value"] is None or b["value"] is None:
        return {"value": None, "low": None, "high": None}
    pa, la, ua = a["value"], a["low"], a["high"]
    pb, lb, ub = b["value"], b["low"], b["high"]
    assert la is not None and ua is not None and lb is not None and ub is not None
    difference = pa - pb
    return {
        "value": _r(difference),
        "low": _r(difference - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2)),
        "high": _r(difference + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)),
    }


@dataclass(frozen=True)
class UserSums:
    """A ratio R = Σy_u / Σn_u over the users u of a group, as the sums its delta-method variance needs:
    n_u is the user's impressions, y_u their clicks, conversions or inverse-propensity weighted clicks."""

    users: int  # m: users with at least one impression
    n: float  # Σn_u
    y: float  # Σy_u
    nn: float  # Σn_u²
    yy: float  # Σy_u²
    yn: float  # Σy_u·n_u

    @property
    def ratio(self) -> float | None:
        return self.y / self.n if self.n else None


def ratio_variance(sums: UserSums) -> float | None:
    """Var(R) ≈ Σ(y_u - R·n_u)² / (m(m-1)·n̄²), n̄ = Σn_u/m: the delta method with the user as the unit.
    Users, not impressions, are randomized between the arms, and one user's impressions are correlated
    (some users click much more than others), so impressions are not independent trials. None with
    fewer than two users: there is no spread between users to measure."""
    ratio = sums.ratio
    if ratio is None or sums.users < 2:
        return None
    residual = sums.yy - 2 * ratio * sums.yn + ratio * ratio * sums.nn  # Σ(y_u - R·n_u)², expanded
    mean_n = sums.n / sums.users
    return max(0.0, residual) / (sums.users * (sums.users - 1) * mean_n * mean_n)


def clustered_wilson(sums: UserSums) -> dict[str, float | None]:
    """A rate over impressions with a Wilson interval on the effective sample size
    n_eff = p(1-p) / Var_user(R), capped at the impressions: the design effect of users' correlated
    impressions, while keeping Wilson's behaviour at small counts and rates near 0. With no spread
    between users at all, n_eff is the impressions; with one user there is no spread to measure, and
    n_eff is that one user (the unit that was randomized): one user's thousand impressions say little
    about the next user."""
    p, variance = sums.ratio, ratio_variance(sums)
    if p is None:
        return wilson(0, 0)
    if variance is None:
        return wilson(p * sums.users, sums.users)
    effective = min(sums.n, p * (1 - p) / variance) if variance else sums.n
    return wilson(p * effective, effective)


def clustered_normal(sums: UserSums) -> dict[str, float | None]:
    """A ratio (the IPS click rate: not a share, it may exceed 1) with the delta-method normal interval;
    no bounds with fewer than two users."""
    value, variance = sums.ratio, ratio_variance(sums)
    if value is None:
        return {"value": None, "low": None, "high": None}
    if variance is None:
        return {"value": _r(value), "low": None, "high": None}
    return _normal_interval(value, math.sqrt(variance))


def clustered_difference(a: UserSums, b: UserSums) -> dict[str, float | None]:
    """R_a - R_b with a normal interval; the arms hold different users, so their variances add."""
    va, vb = ratio_variance(a), ratio_variance(b)
    if a.ratio is None or b.ratio is None:
        return {"value": None, "low": None, "high": None}
    if va is None or vb is None:
        return {"value": _r(a.ratio - b.ratio), "low": None, "high": None}
    return _normal_interval(a.ratio - b.ratio, math.sqrt(va + vb))


def _normal_interval(mean: float, standard_error: float) -> dict[str, float | None]:
    return {"value": _r(mean), "low": _r(mean - Z * standard_error), "high": _r(mean + Z * standard_error)}


def _r(value: float) -> float:
    return round(value, 6)


def propensities(model: str, eta: float, clicks_by_position: dict[int, tuple[int, int]]) -> dict[int, float]:
    """θ_p for every position seen; `clicks_by_position` maps position → (impressions, clicks), pooled."""
    positions = sorted(clicks_by_position)
    if model == "power":
        return {p: max(MIN_PROPENSITY, p**-eta) for p in positions}
    impressions_1, clicks_1 = clicks_by_position.get(1, (0, 0))
    if not clicks_1:
        raise BadInputError(
            "cannot estimate propensities: no clicks at position 1 in the period; use --propensity power"
        )
    top_rate = clicks_1 / impressions_1
    theta, running = {}, 1.0
    for p in positions:
        impressions, clicks = clicks_by_position[p]
        if impressions:
            running = min(running, clicks / impressions / top_rate)
        theta[p] = max(MIN_PROPENSITY, min(1.0, running))
    return theta


# ---------------------------------------------------------------------------- the report


@dataclass
class _Group:
    """One row of the report (a variant, a batch or a model): what was served, and the sums over its
    users of what they did (None when nobody in it sent feedback)."""

    requests: int = 0
    users: int = 0
    served: int = 0
    outcomes: dict[str, Any] | None = None

    def sums(self, outcome: str) -> UserSums | None:
        """`outcome` is clicks, conversions or ips (inverse-propensity weighted clicks), over impressions."""
        row = self.outcomes
        if row is None:
            return None
        return UserSums(
            users=row["impressed_users"],
            n=row["impressions"],
            y=row[outcome],
            nn=row["impressions_squared"],
            yy=row[f"{outcome}_squared"],
            yn=row[f"{outcome}_impressions"],
        )

    def summary(self) -> dict[str, Any]:
        row = self.outcomes or {}
        clicks, conversions, ips = self.sums("clicks"), self.sums("conversions"), self.sums("ips")
        nothing = wilson(0, 0)  # with no feedback at all there is nothing to estimate, not a rate of 0
        return {
            "requests": self.requests,
            "users": self.users,
            "served": self.served,
            "impressed_users": row.get("impressed_users", 0),
            "impressions": row.get("impressions", 0),
            "clicks": row.get("clicks", 0),
            "conversions": row.get("conversions", 0),
            "ctr": clustered_wilson(clicks) if clicks else nothing,
            "conversion_rate": clustered_wilson(conversions) if conversions else nothing,
            "ips_click_rate": clustered_normal(ips) if ips else nothing,
        }


def _offline(metrics: dict[str, Any] | None) -> dict[str, float | None]:
    """A model's held-out metrics as registered (None where it has none: a model registered without evaluation)."""
    return {name: (metrics or {}).get(name) for name in OFFLINE_METRICS}


def _period(start: date, end: date) -> tuple[datetime, datetime]:
    """Both days included: from the start of `start` (UTC) to the start of the day after `end`."""
    if end < start:
        raise BadInputError(f"--to {end} is before --from {start}")
    return lake.day_start(start), lake.day_end(end)


def online_report(
    settings: Settings, start: date, end: date, propensity: str = "power", eta: float = 1.0
) -> dict[str, Any]:
    """Per variant and per batch: requests, impressions, CTR, conversion rate and the IPS click rate."""
    if propensity not in PROPENSITY_MODELS:
        raise BadInputError(f"unknown propensity model {propensity!r}; choose {' or '.join(PROPENSITY_MODELS)}")
    if eta < 0:
        raise BadInputError(f"--eta must not be negative, got {eta:g}")
    first, last = _period(start, end)
    window = {"start": first, "end": last, "feedback_end": last + FEEDBACK_GRACE}
    with connect(settings) as conn:
        upgrade(conn)
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql.query("online_impressed"), window)
            by_position = {
                row["position"]: (row["impressions"], row["clicks"])
                for row in cur.execute(sql.query("online_impressions_by_position")).fetchall()
            }
            theta = propensities(propensity, eta, by_position) if by_position else {}
            weights = {"positions": list(theta), "theta": list(theta.values())}
            outcomes = cur.execute(sql.query("online_outcomes"), weights).fetchall()
            requests = cur.execute(sql.query("online_requests"), window).fetchall()
            unattributed = {
                row["event_type"]: row["count"]
                for row in cur.execute(sql.query("unattributed_feedback"), window).fetchall()
            }
            served_batches = sorted({row["batch_id"] for row in requests if row["level"] == "batch"})
            registered = cur.execute(sql.query("batch_models"), {"batch_ids": served_batches}).fetchall()
    model_of: dict[int, str] = defaultdict(lambda: UNKNOWN_MODEL, {r["batch_id"]: r["model_id"] for r in registered})
    offline = defaultdict(lambda: _offline(None), {r["model_id"]: _offline(r["metrics"]) for r in registered})

    by_variant: dict[str, _Group] = defaultdict(_Group)
    by_batch: dict[tuple[str, int], _Group] = defaultdict(_Group)
    by_model: dict[str, _Group] = defaultdict(_Group)
    while_canary: dict[str, _Group] = defaultdict(_Group)  # the answers served while a canary ran

    def group(row: dict[str, Any]) -> _Group:
        """The group a row of online_outcomes or online_requests is about (each comes per level)."""
        if row["level"] == "variant":
            return by_variant[row["variant"]]
        if row["level"] == "batch":
            return by_batch[(row["variant"], row["batch_id"])]
        if row["level"] == "while_canary":
            return while_canary[row["variant"]] if row["while_canary"] else _Group()
        return by_model[row["model_id"] or UNKNOWN_MODEL]

    for row in outcomes:  # the sums over the group's users, computed in SQL
        group(row).outcomes = row
    for row in requests:  # users are distinct users of the group, counted in SQL, never summed here
        served = group(row)
        served.requests, served.served, served.users = row["requests"], row["served"], row["users"]

    variants = {name: group.summary() for name, group in sorted(by_variant.items())}
    report: dict[str, Any] = {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "propensity": {
            "model": propensity,
            **({"eta": eta} if propensity == "power" else {}),
            "by_position": {str(p): _r(t) for p, t in sorted(theta.items())},
        },
        "variants": variants,
        "batches": [
            {
                "variant": variant,
                "batch_id": batch_id,
                "model_id": model_of[batch_id],
                **group.summary(),
                "offline": offline[model_of[batch_id]],
            }
            for (variant, batch_id), group in sorted(by_batch.items())
        ],
        "models": {
            model_id: {**group.summary(), "offline": offline[model_id]} for model_id, group in sorted(by_model.items())
        },
        "unattributed_feedback": unattributed,
    }
    # Only the answers served while a canary ran: the users were split between the arms then, whereas a
    # whole day's production answers include the hours before the canary started (another batch, other
    # hours' traffic). A user moved to the canary by a ramp is in both arms.
    if CANARY_VARIANT in while_canary and PRODUCTION_VARIANT in while_canary:
        canary, production = while_canary[CANARY_VARIANT], while_canary[PRODUCTION_VARIANT]

        def difference(outcome: str) -> dict[str, float | None]:
            a, b = canary.sums(outcome), production.sums(outcome)
            if a is None or b is None:
                return wilson(0, 0)
            if outcome == "ips":
                return clustered_difference(a, b)
            return newcombe(clustered_wilson(a), clustered_wilson(b))

        report["canary_minus_production"] = {
            "while_canary_ran": {
                name: {key: arm.summary()[key] for key in ("impressed_users", "impressions")}
                for name, arm in ((CANARY_VARIANT, canary), (PRODUCTION_VARIANT, production))
            },
            "ctr": difference("clicks"),
            "conversion_rate": difference("conversions"),
            "ips_click_rate": difference("ips"),
        }
        canary_models = sorted({b["model_id"] for b in report["batches"] if b["variant"] == CANARY_VARIANT})
        if len(canary_models) > 1:
            report["canary_minus_production"]["warning"] = (
                f"the canary arm pools the answers of {len(canary_models)} models ({', '.join(canary_models)}): "
                "the difference is of their mix; report a period with one canary model, or compare the batch rows"
            )
    return report


def online_by_model(settings: Settings, days: int, today: date | None = None) -> dict[str, dict[str, Any]]:
    """Each served model's online numbers over the last `days` days, today (UTC) included."""
    today = today or datetime.now(UTC).date()
    report = online_report(settings, today - timedelta(days=days - 1), today)
    return {
        model_id: {"from": report["from"], "to": report["to"], **online_part(values)}
        for model_id, values in report["models"].items()
    }


def online_part(values: dict[str, Any]) -> dict[str, Any]:
    """A model's row of the report without the offline metrics it carries beside them."""
    return {key: value for key, value in values.items() if key != "offline"}


def record_day(
    settings: Settings,
    day: date,
    propensity: str = "power",
    eta: float = 1.0,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Store the day's online numbers per served model in ``overnight.online_daily``, replacing what was
    stored for that day: the online report of that one day, its rows per model. The nightly DAG records
    the day before its date, whose day of feedback grace has passed by then (`complete`)."""
    return store_day(settings, online_report(settings, day, day, propensity, eta), now)


def store_day(settings: Settings, report: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    """`record_day` with the one-day report already made (``--from D --to D --record`` prints it too)."""
    day = date.fromisoformat(report["from"])
    if report["to"] != report["from"]:
        raise ValueError(f"a report of one day is stored, not {report['from']} .. {report['to']}")
    complete = (now or datetime.now(UTC)) >= lake.day_end(day) + FEEDBACK_GRACE
    with connect(settings) as conn, conn.transaction():
        conn.execute(sql.query("delete_online_daily"), {"day": day})
        for model_id, values in report["models"].items():
            conn.execute(
                sql.query("insert_online_daily"),
                {
                    "day": day,
                    "model_id": model_id,
                    "summary": jsonb(online_part(values)),
                    "complete": complete,
                },
            )
    return {"day": day.isoformat(), "models": sorted(report["models"]), "complete": complete}


def record_previous_day(settings: Settings, logical_date: date) -> dict[str, Any]:
    """The nightly run's `record_day`: the day before its date, complete once the date has ended."""
    return record_day(settings, logical_date - timedelta(days=1))


@dataclass(frozen=True)
class OnlineUpkeep:
    """What `nightly_upkeep` did: the tables' partitions (`maintain_tables`) and the day it recorded."""

    tables: dict[str, Any]
    recorded: dict[str, Any]

    def outcome(self) -> Outcome:
        return Outcome(self.summary())

    def summary(self) -> str:
        created, dropped = (sum(self.tables[key].values()) for key in ("created_partitions", "dropped_partitions"))
        return (
            f"online tables: {created} daily partitions created, {dropped} dropped; "
            f"{self.recorded['day']} recorded for {len(self.recorded['models'])} served models"
        )


def nightly_upkeep(settings: Settings, logical_date: date) -> OnlineUpkeep:
    """`overnight run`'s counterpart of the DAG's online_tables and online_summary tasks."""
    return OnlineUpkeep(maintain_tables(settings), record_previous_day(settings, logical_date))


def render(report: dict[str, Any]) -> Iterable[str]:
    """The report as a few aligned lines of text."""

    def interval(metric: dict[str, float | None]) -> str:
        if metric["value"] is None:
            return "—"
        if metric["low"] is None:  # a single user: no spread between users to measure
            return f"{metric['value']:.4f} [n/a]"
        return f"{metric['value']:.4f} [{metric['low']:.4f}, {metric['high']:.4f}]"

    yield f"online report {report['from']} .. {report['to']} (95% intervals)"
    if not report["variants"]:
        yield f"no logged answers between {report['from']} and {report['to']} (UTC days, both included)"
        if report["unattributed_feedback"]:
            yield f"feedback not matched to a logged answer: {report['unattributed_feedback']}"
        return
    propensity = report["propensity"]
    shown = ", ".join(f"{p}:{t:.2f}" for p, t in list(propensity["by_position"].items())[:10])
    eta = f" (eta {propensity['eta']:g})" if "eta" in propensity else ""
    yield f"propensity model {propensity['model']}{eta}, theta by position: {shown}"
    yield (
        f"{'variant':<11} {'batch':>6} {'requests':>9} {'impressions':>11} {'clicks':>7}  "
        f"{'CTR':<26} {'conversion':<26} {'IPS click rate':<26} model"
    )
    rows = [(name, "all", v) for name, v in report["variants"].items()]
    rows += [(b["variant"], str(b["batch_id"]), b) for b in report["batches"]]
    for name, batch, values in rows:
        yield (
            f"{name:<11} {batch:>6} {values['requests']:>9,} {values['impressions']:>11,} {values['clicks']:>7,}  "
            f"{interval(values['ctr']):<26} {interval(values['conversion_rate']):<26} "
            f"{interval(values['ips_click_rate']):<26} {values.get('model_id', '')}"
        )
    if report["models"]:
        yield "offline (held-out metrics the model was registered with) beside online, per model:"
        yield f"{'model':<34} {'ndcg@10':>8} {'recall@10':>9}  {'CTR':<26} {'IPS click rate':<26}"
        for model_id, values in report["models"].items():
            ndcg, recall = (values["offline"][name] for name in ("ndcg@10", "recall@10"))
            yield (
                f"{model_id:<34} {metric_text(ndcg):>8} {metric_text(recall):>9}  "
                f"{interval(values['ctr']):<26} {interval(values['ips_click_rate']):<26}"
            )
    if "canary_minus_production" in report:
        delta = report["canary_minus_production"]
        arms = delta["while_canary_ran"]
        yield (
            "canary - production over the answers served while a canary ran "
            f"({arms[CANARY_VARIANT]['impressions']:,} and {arms[PRODUCTION_VARIANT]['impressions']:,} impressions):"
        )
        yield (
            f"  CTR {interval(delta['ctr'])}, conversion {interval(delta['conversion_rate'])}, "
            f"IPS click rate {interval(delta['ips_click_rate'])}"
        )
        if "warning" in delta:
            yield f"  warning: {delta['warning']}"
    if report["unattributed_feedback"]:
        yield f"feedback not matched to a logged answer: {report['unattributed_feedback']}"


# ---------------------------------------------------------------------------- upkeep


def maintain_tables(settings: Settings, today: date | None = None, days_ahead: int = 7) -> dict[str, Any]:
    """Create the daily partitions of the next days and drop those older than OVERNIGHT_ONLINE_KEEP_DAYS;
    delete the service's write ids (``overnight.bulk_writes``) older than 2 days, by the clock."""
    today = today or datetime.now(UTC).date()
    keep_from = today - timedelta(days=settings.online_keep_days)
    created: dict[str, int] = {}
    dropped: dict[str, int] = {}
    with connect(settings) as conn:
        upgrade(conn)
        for table in PARTITIONED_TABLES:
            with conn.transaction():
                row = conn.execute(
                    sql.query("ensure_daily_partitions"),
                    (table, today - timedelta(days=1), today + timedelta(days=days_ahead)),
                ).fetchone()
                created[table] = int(row[0]) if row else 0
                row = conn.execute(sql.query("drop_daily_partitions"), (table, keep_from)).fetchone()
                dropped[table] = int(row[0]) if row else 0
        with conn.transaction():
            write_ids = conn.execute(sql.query("delete_old_bulk_writes")).rowcount
    return {
        "created_partitions": created,
        "dropped_partitions": dropped,
        "kept_from": keep_from.isoformat(),
        "deleted_write_ids": write_ids,
    }
