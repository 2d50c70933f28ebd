"""What the app holds while it runs: settings, metrics, the index follower, the search lanes, the decoder."""

from __future__ import annotations

from dataclasses import dataclass, field

from .admission import Lanes
from .follow import IndexFollower
from .metrics import Metrics
from .settings import Settings
from .uploads import Decoder
from .writes import Writer


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    follower: IndexFollower | None = None
    lanes: dict[str, Lanes] = field(default_factory=dict)
    decoder: Decoder | None = None
    writer: Writer | None = None
