"""A trial's configuration as a type. Optuna, the events log and plan.json keep it as a plain dict keyed by
the search dimensions (engine.search.space); a trial reads it back here, where the defaults of the
dimensions older sessions did not have live."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from engine.config import stored_fields


@dataclass(frozen=True)
class TrialParams:
    calib_source: str
    calib_n: int
    calib_len: int
    calib_select: str  # how the windows are picked from the pool (engine.search.data.pick_indices)
    calib_seed: int
    metric: str
    aggregate: str
    attn_share: str | float  # auto, same, or the attention's share of the cut (engine.config.parse_attn_share)
    first_kept: int  # layers protected at each end
    last_kept: int
    metric2: str = "none"  # a second, decomposable metric mixed in with weight `mix`
    mix: float = 0.5
    allocation: str = "uniform"
    ramp: float = 0.0  # with uniform: > 0 prunes deeper layers more
    repair: str = "none"  # the reconstruction's text: none, a source, or every pool (space.ALL)
    repair_lambda: float = 1.0
    repair_n: int | None = None  # windows of the repair text's pool (None: the session's pool size)

    @classmethod
    def from_dict(cls, data: object) -> TrialParams:
        return cls(**stored_fields(cls, data, "search dimension(s)", "a trial's parameters"))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def mixing(self) -> bool:
        return self.metric2 not in ("none", self.metric)
