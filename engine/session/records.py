"""What a session's files hold, as types: the best trial's record (plan.json), the LoRA recovery's state
(recovery/state.json) and a session's row in the sessions table. Stored as plain JSON; read back strictly
(a key this version does not know is an error naming it, never silently dropped)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from engine.config import RecoverConfig, stored_fields


@dataclass(frozen=True)
class BestRecord:
    """The best trial so far: its number, objective, search parameters (engine.search.space) and plan
    (`Plan.to_dict()`, so any later process rebuilds the same model)."""

    trial: int
    value: float
    params: dict
    plan: dict

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, what: str = "the best plan (plan.json)") -> BestRecord:
        return cls(**stored_fields(cls, data, "key(s)", what))


@dataclass
class RecoveryState:
    """A LoRA recovery on disk: its configuration, the plan it trains (and that plan's identity), how far it
    got, the history of its steps, and the checkpoint folder holding the adapter and optimiser moments."""

    config: RecoverConfig
    step: int
    status: str  # running, stopped or done
    plan: str = "best"
    plan_id: str = ""
    valid_ppl_before: float | None = None
    valid_ppl_after: float | None = None
    history: list[dict] = field(default_factory=list)
    train_windows: int = 0
    data: dict[str, str] = field(default_factory=dict)  # each training text's SHA-256 (changed: --resume refused)
    valid: dict[str, str] = field(default_factory=dict)  # and each validation text's
    trainable_params: int = 0
    params: int = 0
    started: float | None = None
    finished: float | None = None
    param_groups: list[dict] = field(default_factory=list)  # the optimiser's, beside its moments
    checkpoint: str | None = None  # None: the first layout's checkpoint in recovery/ itself

    def to_dict(self) -> dict:
        return asdict(self)  # the config too: asdict recurses into dataclasses

    @classmethod
    def from_dict(cls, data: object, what: str = "the recovery's state (recovery/state.json)") -> RecoveryState:
        data = dict(stored_fields(cls, data, "key(s)", what))
        data["config"] = RecoverConfig.from_dict(data["config"])
        return cls(**data)

    def progress(self) -> str:
        """"done", or e.g. "stopped 40/100"."""
        return self.status if self.status == "done" else f"{self.status} {self.step}/{self.config.steps}"


@dataclass
class SessionRow:
    """One row of the sessions table (`engine.session.summary`)."""

    name: str
    model: str
    prune: float
    trials: int
    status: str
    updated: float | None = None  # when anything of the session last changed
    done: int = 0  # completed trials
    best: float | None = None  # the best objective so far
    recovery: str | None = None  # the LoRA recovery: "done", "running 40/100", "paused", ...
    doing: list[str] = field(default_factory=list)  # a line per live process of the session
    problem: str | None = None  # what is damaged, when something is

    def add_problem(self, text: str) -> None:
        self.problem = f"{self.problem}; {text}" if self.problem else text
