"""webhook.memo.AnswerMemo: kept on the second miss, least recently used out first, bounded in count and key size,
answers only for the very settings object they were decided with. DecisionMemo: bounded by the bytes of its keys."""

from __future__ import annotations

from webhook import memo
from webhook.memo import AnswerMemo

SETTINGS = object()


def key(i: int) -> bytes:
    return f'["ml",{{"generateName":"web-{i}-"}}]'.encode()


def answer(i: int) -> dict:
    return {"response": {"uid": "", "allowed": True, "n": i}}


def test_a_key_is_kept_on_its_second_miss_only():
    m = AnswerMemo()
    m.put(key(1), SETTINGS, answer(1))
    assert m.get(key(1), SETTINGS) is None and len(m) == 0
    m.put(key(1), SETTINGS, answer(1))
    assert m.get(key(1), SETTINGS) == answer(1) and len(m) == 1


def test_one_off_keys_never_push_out_a_recurring_one():
    m = AnswerMemo()
    for _ in range(2):
        m.put(key(0), SETTINGS, answer(0))
    for i in range(1, 10 * memo.LIMIT):  # a DaemonSet rollout: every pod pinned to its own node
        m.put(key(i), SETTINGS, answer(i))
    assert m.keys() == [key(0)]
    assert m.get(key(0), SETTINGS) == answer(0)


def test_least_recently_used_go_first_and_the_count_is_bounded():
    m = AnswerMemo()
    for i in range(memo.LIMIT + 10):
        for _ in range(2):
            m.put(key(i), SETTINGS, answer(i))
        if i % 50 == 0:
            assert m.get(key(0), SETTINGS) == answer(0)  # kept in use
        assert len(m) <= memo.LIMIT
    kept = m.keys()
    assert len(kept) == memo.LIMIT
    assert key(0) in kept and key(1) not in kept and kept[-1] == key(memo.LIMIT + 9)


def test_the_first_sightings_are_bounded_too():
    m = AnswerMemo()
    for i in range(memo.SEEN_LIMIT + 100):
        m.put(key(i), SETTINGS, answer(i))
    assert len(m._seen) == memo.SEEN_LIMIT
    m.put(key(0), SETTINGS, answer(0))  # its first sighting was forgotten: a first sighting again
    assert len(m) == 0
    m.put(key(memo.SEEN_LIMIT + 99), SETTINGS, answer(1))  # still remembered as seen: kept
    assert len(m) == 1


def test_keys_over_the_size_limit_are_never_kept():
    m = AnswerMemo()
    big = b"x" * (memo.KEY_MAX_BYTES + 1)
    for _ in range(3):
        m.put(big, SETTINGS, answer(1))
    assert len(m) == 0 and len(m._seen) == 0


def test_an_answer_is_only_given_for_the_settings_it_was_decided_with():
    m = AnswerMemo()
    other = object()
    for _ in range(2):
        m.put(key(1), SETTINGS, answer(1))
    assert m.get(key(1), other) is None
    m.put(key(1), other, answer(2))  # decided again under the other settings: replaces it
    assert m.get(key(1), other) == answer(2) and m.get(key(1), SETTINGS) is None


# --- DecisionMemo: nodes.choose_mode's decisions, bounded by the bytes of their keys ---------------------------


def test_decision_keys_over_the_size_limit_are_never_kept():
    m = memo.DecisionMemo()
    m[("auto", True, "1.33", "1.35", "x" * memo.DECISION_KEY_MAX_BYTES)] = "big"
    m[("auto", True, "1.33", "1.35", "small")] = "small"
    assert len(m) == 1 and m.get(("auto", True, "1.33", "1.35", "small")) == "small"


def test_decisions_stay_within_their_byte_budget_least_recently_used_out_first():
    m = memo.DecisionMemo()
    kept = ("auto", True, "1.33", "1.35", "recurring")
    m[kept] = "recurring"
    for i in range(2 * memo.DECISION_BUDGET_BYTES // 8000):
        m[("auto", True, "1.33", "1.35", f"{i:08d}" + "t" * 8000)] = i
        assert m.get(kept) == "recurring"  # used between the others: never the least recently used
        assert m.size <= memo.DECISION_BUDGET_BYTES
    assert len(m) < memo.DECISION_BUDGET_BYTES // 8000
    assert m.get(("auto", True, "1.33", "1.35", "00000000" + "t" * 8000)) is None  # the oldest went first
    m.clear()
    assert (len(m), m.size) == (0, 0)


def test_choose_mode_does_not_remember_a_megabyte_of_tolerations():
    from webhook.config import Settings
    from webhook.nodes import choose_mode
    from webhook.snapshot import snapshot_from

    fleet = snapshot_from(
        [{"metadata": {"name": "n1"}, "status": {"nodeInfo": {"containerRuntimeVersion": "cri-o://1.34.1",
                                                               "kubeletVersion": "v1.35.0"}}}],
        [], synced=True,
    )
    settings = Settings()
    for i in range(20):
        tolerations = [{"key": f"k{i}-{j}", "operator": "Exists"} for j in range(25_000)]  # ~1 MB each
        assert choose_mode("auto", {"tolerations": tolerations}, fleet, settings).mode == "image-volume"
    assert (len(fleet.memo), fleet.memo.size) == (0, 0)
    choose_mode("auto", {"tolerations": [{"key": "gpu", "operator": "Exists"}]}, fleet, settings)
    assert len(fleet.memo) == 1
