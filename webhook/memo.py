"""Whole admission answers remembered per inventory snapshot (admission.mutate_review fills and reads it).

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
KEY_MAX_BYTES = 64 * 1024  # pod metadata + spec are ~5-30 KB; the body limit is 16 MiB
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


def _pop_oldest(d: OrderedDict[Any, Any]) -> None:
    try:
        d.popitem(last=False)
    except KeyError:
        pass
