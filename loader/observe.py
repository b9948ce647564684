"""What the node agent's metrics are told by the parts that pull and publish (loader/agent.py counts; the prefetcher
and the CSI plugin report). Types only: the reporters never import the metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from loader.errors import LoaderError
    from loader.pull import PullResult

#: A pull ended: (ref, seconds, the result, or the error it failed with).
PullObserver: TypeAlias = "Callable[[str, float, PullResult | None, LoaderError | None], None]"
#: A NodePublishVolume call ended: (seconds, the gRPC code it answered, e.g. "OK" or "ABORTED").
PublishObserver: TypeAlias = Callable[[float, str], None]
