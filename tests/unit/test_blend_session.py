"""`blend_session` as its docstring defines it, checked against the definition written out plainly."""

import random

from common.session import SESSION_RECENCY_DECAY, SESSION_USER_WEIGHT, Ranked, blend_session


def blend_by_definition(
    neighbours: list[Ranked | None], leave_out: set[str], user_list: list[str]
) -> list[tuple[str, float]]:
    weight_sum = sum(SESSION_RECENCY_DECAY**position for position in range(len(neighbours)))
    totals: dict[str, float] = {}
    for position, ranked in enumerate(neighbours):
        if ranked is None or not ranked[0] or max(ranked[1]) <= 0:
            continue
        scale = SESSION_RECENCY_DECAY**position / (max(ranked[1]) * weight_sum)
        for item_id, score in zip(*ranked, strict=True):
            if item_id not in leave_out:
                totals[item_id] = totals.get(item_id, 0.0) + score * scale
    for position, item_id in enumerate(user_list):
        if item_id not in leave_out:
            totals[item_id] = totals.get(item_id, 0.0) + SESSION_USER_WEIGHT * (1 - position / len(user_list))
    order = sorted(range(len(totals)), key=lambda index: -list(totals.values())[index])
    return [list(totals.items())[index] for index in order]


def test_blend_matches_its_definition_on_random_sessions() -> None:
    rng = random.Random(3)
    catalogue = [f"i{number}" for number in range(40)]
    for _ in range(300):
        neighbours: list[Ranked | None] = []
        for _ in range(rng.randint(0, 5)):
            if rng.random() < 0.15:
                neighbours.append(None)
                continue
            # Lists may repeat an item, share items with each other, tie, or be all zero.
            item_ids = [rng.choice(catalogue) for _ in range(rng.randint(0, 12))]
            scores = sorted((rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in item_ids), reverse=True)
            neighbours.append((item_ids, scores))
        leave_out = set(rng.sample(catalogue, rng.randint(0, 6)))
        user_list = rng.sample(catalogue, rng.randint(0, 8)) if rng.random() < 0.5 else []
        assert blend_session(neighbours, leave_out, user_list) == blend_by_definition(neighbours, leave_out, user_list)
