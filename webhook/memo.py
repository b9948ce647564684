"""Memos per inventory snapshot, bounded in bytes: whole admission answers (:class:`AnswerMemo`,
admission.mutate_review fills and reads it) and scheduling decisions (:class:`DecisionMemo`, nodes.choose_mode).

The replicas of one pod template differ only in fields the decision never reads, so a scale-out of 100 pods is
decided once. Policy, and why:

* least recently used out first, at most LIMIT answers; keys over KEY_MAX_BYTES are never kept, so the memo
  holds at most LIMIT x KEY_MAX_BYTES of keys (a few MB for real pods);
* an answer is kept only the second time its key misses. One-off pods (a DaemonSet's, each pinned to its node;
  pods created by name) never repeat, and under "keep on first miss" a rollout of them would push out every
  template that is actually recurring. The first sight costs a hash in a bounded set of SEEN_LIMIT.

Not thread-safe beyond what dict operations give under the GIL: the webhook reviews on one event loop thread;
a concurrent eviction only turns a hit into a miss (KeyError is tolerated).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from webhook.models import AdmissionReviewResponse

LIMIT = 256
KEY_MAX_BYTES = 64 * 1024  # pod metadata + spec are ~5-30 KB; the body limit is 7 MiB (webhook/app.py)
SEEN_LIMIT = 4096


class AnswerMemo:
    __slots__ = ("_answers", "_seen")

    def __init__(self) -> None:
        self._answers: OrderedDict[bytes, tuple[Any, AdmissionReviewResponse]] = OrderedDict()
        self._seen: OrderedDict[int, None] = OrderedDict()

    def get(self, key: bytes, settings: Any) -> AdmissionReviewResponse | None:
        """The answer remembered for ``key`` under these very settings (identity), or None."""
        hit = self._answers.get(key)
        if hit is None or hit[0] is not settings:
            return None
        try:
            self._answers.move_to_end(key)
        except KeyError:  # evicted meanwhile: the answer in hand is still right
            pass
        return hit[1]

    def put(self, key: bytes, settings: Any, answer: AdmissionReviewResponse) -> None:
        """Remember ``answer`` if ``key`` missed before (and is small enough). The settings object is held with
        it, so its id cannot be reused by other settings while the answer lives."""
        if len(key) > KEY_MAX_BYTES:
            return
        if key not in self._answers:
            digest = hash(key)  # a collision only admits a key early; lookups compare the whole key
            if digest not in self._seen:
                self._seen[digest] = None
                while len(self._seen) > SEEN_LIMIT:
                    _pop_oldest(self._seen)
                return
            self._seen.pop(digest, None)
        self._answers[key] = (settings, answer)
        try:
            self._answers.move_to_end(key)  # a replaced entry (other settings) is the newest too
        except KeyError:
            pass
        while len(self._answers) > LIMIT:
            _pop_oldest(self._answers)

    def __len__(self) -> int:
        return len(self._answers)

    def keys(self) -> list[bytes]:
        """Remembered keys, least recently used first (for tests and debugging)."""
        return list(self._answers)


# Decisions per scheduling constraint (nodeSelector, required node affinity, tolerations: a few hundred bytes for
# real pods). A pod may carry ~1 MB of tolerations, and a count bound alone (nodes.py's 4096) would then hold
# gigabytes: keys over DECISION_KEY_MAX_BYTES are never kept (such a pod is decided afresh each time, which costs
# what deciding costs anyway), and the kept keys total at most DECISION_BUDGET_BYTES, least recently used out first.
DECISION_KEY_MAX_BYTES = 16 * 1024
DECISION_BUDGET_BYTES = 4 * 1024 * 1024
_ENTRY_OVERHEAD = 256  # the tuple, the dict slot and the decision itself, roughly; so that tiny keys count too


def _key_bytes(key: Any) -> int:
    """The size a decision key is charged: the lengths of its strings plus a fixed overhead."""
    parts = key if isinstance(key, tuple) else (key,)
    return _ENTRY_OVERHEAD + sum(len(p) for p in parts if isinstance(p, str | bytes))


class DecisionMemo:
    """A dict-like memo (``get``, ``[key] = value``, ``len``, ``clear``) bounded by the total size of its keys."""

    __slots__ = ("_bytes", "_entries")

    def __init__(self) -> None:
        self._entries: OrderedDict[Any, tuple[int, Any]] = OrderedDict()
        self._bytes = 0

    def get(self, key: Any) -> Any | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        try:
            self._entries.move_to_end(key)
        except KeyError:  # evicted meanwhile: the value in hand is still right
            pass
        return hit[1]

    def __setitem__(self, key: Any, value: Any) -> None:
        size = _key_bytes(key)
        if size > DECISION_KEY_MAX_BYTES:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[0]
        self._entries[key] = (size, value)
        self._bytes += size
        while self._bytes > DECISION_BUDGET_BYTES and self._entries:
            try:
                _, (dropped, _) = self._entries.popitem(last=False)
            except KeyError:
                break
            self._bytes -= dropped

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """The bytes its keys are charged (at most DECISION_BUDGET_BYTES)."""
        return self._bytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


def _pop_oldest(d: OrderedDict[Any, Any]) -> None:
    try:
        d.popitem(last=False)
    except KeyError:
        pass
