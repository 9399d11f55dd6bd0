"""What a pass is: a frozen config dataclass, a numerical contract, and `run(ir, ctx)` returning a
PassResult whose `modified` is exactly whether the graph or its tensors changed."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from lowbit.ir.errors import LowbitError
from lowbit.ir.store import Checkpoint


@dataclass(frozen=True)
class Exact:
    """The function is unchanged up to float rounding: max|after - before| / max|before| <= rtol."""
    rtol: float = 1e-4

    def __str__(self):
        return f"exact (rtol {self.rtol:g})"


@dataclass(frozen=True)
class Lossy:
    """Logits after the pass keep at least `min_sqnr_db` dB signal-to-noise against before."""
    min_sqnr_db: float

    def __str__(self):
        return f"lossy (SQNR >= {self.min_sqnr_db:g} dB)"


@dataclass
class PassResult:
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Needs:
    """A pass that must run before this one (in the pipeline, or already on the model loaded) or
    after it (in the pipeline), checked when the pipeline is parsed. `when`: the options of this
    pass for which the need holds; `match`: options the other pass must have."""
    name: str
    before: bool = True
    when: tuple[tuple[str, Any], ...] = ()
    match: tuple[tuple[str, Any], ...] = ()

    def applies(self, config) -> bool:
        return all(getattr(config, k) == v for k, v in self.when)

    def met_by(self, name: str, config) -> bool:
        return name == self.name and all(getattr(config, k) == v for k, v in self.match)

    def __str__(self):
        other = self.name + ("{" + ",".join(f"{k}={format_value(v)}" for k, v in self.match) + "}" if self.match else "")
        shown = [(k, v) for k, v in self.when if v != ""]   # an empty option reads as "not given"
        cond = ("with " + ",".join(f"{k}={format_value(v)}" for k, v in shown) + ": ") if shown else ""
        return f"{cond}needs {other} {'before' if self.before else 'after'} it"


@dataclass
class PassContext:
    """What a pass may need besides the IR: the seed, calibration tokens, progress display, and
    the later pipeline entries of the pass classes it declares it reads (Pass.reads_later)."""
    seed: int = 0
    calib: torch.Tensor | None = None     # [n, ctx] token windows from calibration text
    progress: bool = False
    device: torch.device = torch.device("cpu")   # where calibration walks, Hessians and GPTQ run
    later: dict = field(default_factory=dict)   # pass class -> its entries after the running pass (set by the manager)
    resume: Path | None = None            # where passes keep finished pieces, so a killed compile resumes
    checkpoint: Checkpoint | None = None  # the running entry's part of `resume` (set by the manager)
    # which of the running pass's applications (a linear, a norm, a layer's rotation: its units, by
    # name) it may make: those `only` matches (fnmatch patterns joined by '|'), and of them the
    # first `limit`; `applied` lists the units it made (all set by the manager, per entry)
    only: str | None = None
    limit: int | None = None
    applied: list[str] = field(default_factory=list)

    def applies(self, unit: str) -> bool:
        """Whether the running pass makes its application to `unit`; every pass asks before each
        one, in a fixed order, so that a pass can be restricted to some of them (`only=`, and
        `debug bisect`'s search for the one that breaks a model)."""
        from fnmatch import fnmatchcase
        if self.only is not None and not any(fnmatchcase(unit, p) for p in self.only.split("|")):
            return False
        if self.limit is not None and len(self.applied) >= self.limit:
            return False
        self.applied.append(unit)
        return True

    def following(self, cls) -> list:
        """The entries of pass class `cls` after the running pass; the pass must declare it reads them."""
        if cls not in self.later:
            raise PassFailure(f"asked for later '{cls.name}' entries without declaring it in reads_later")
        return self.later[cls]


def ranks() -> tuple[int, int]:
    """(this process's rank, the number of processes) of a compile launched by torchrun; (0, 1) alone."""
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over the compile's processes (in place; t itself when alone)."""
    if ranks()[1] > 1:
        import torch.distributed as dist
        dist.all_reduce(t)
    return t


def my_share(t: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share of the rows of t (calibration windows): all of them alone."""
    rank, world = ranks()
    return t.tensor_split(world)[rank] if world > 1 else t


class PassFailure(LowbitError):
    """Raised by a pass; the manager adds which pass it was and what ran before."""

    def __init__(self, message: str, node: fx.Node | None = None):
        super().__init__(message)
        self.node = node


class Pass:
    name: ClassVar[str]
    Config: ClassVar[type]
    needs: ClassVar[tuple[Needs, ...]] = ()     # passes that must run before / after this one
    after: ClassVar[tuple[str, ...]] = ()       # passes that, where both run, must come before this one
    reads_later: ClassVar[tuple[type, ...]] = ()   # pass classes whose later entries this pass reads (ctx.following)
    # rewrites values inside the model into another basis, exactly (rotations, centering): `debug compare`
    # replays such passes on a source model to compare its inner values with an artifact's
    changes_basis: ClassVar[bool] = False
    applications: ClassVar[str] = ""   # what the pass applies itself to, one by one, by name (PassContext.applies)

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def doc(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]

    def contract(self) -> Exact | Lossy:
        raise NotImplementedError

    def run(self, ir, ctx: PassContext) -> PassResult:
        raise NotImplementedError


def by_rows(fn):
    """Marks fn as a function of each row of its tensor alone (t @ R), which may be applied to blocks of rows."""
    fn.by_rows = True
    return fn


def in_float64(fn, t: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """fn(t) computed in float64 and returned in float32; a function `by_rows` a block of rows at a
    time, so that a vocabulary-sized table is never whole in float64."""
    if not getattr(fn, "by_rows", False) or t.dim() < 2:
        return fn(t.double()).float()
    out = torch.empty(t.shape, dtype=torch.float32)
    for i in range(0, len(t), rows):
        out[i:i + rows] = fn(t[i:i + rows].double())
    return out


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    assert dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen, cls
    REGISTRY[cls.name] = cls
    return cls


def config_fields(cls: type[Pass]) -> dict[str, type]:
    hints = typing.get_type_hints(cls.Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls.Config)}


def parse_value(text: str, typ: type):
    if typ is bool:
        if text not in ("true", "false"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text == "true"
    if typ in (int, float):
        return typ(text)
    return text


def format_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)
