"""The IR: a torch.fx GraphModule (captured once by torch.export, then rewritten by passes) plus
what lowbit knows about the model it came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from . import meta
from .errors import LowbitError
from .store import OnDemand, Rewritten, Spill, Stored

# Wrapper prefix torch.export puts on every parameter and module path of the captured model.
WRAPPER_PREFIX = "model."


@dataclass
class ModelInfo:
    """Facts about the source model that the graph itself does not carry."""
    family: str               # config.model_type, for reports only: no pass branches on it
    vocab_size: int
    max_ctx: int
    source: str               # the path or name it was loaded from
    source_hash: str          # sha256 of the checkpoint file(s)
    extra: dict[str, Any] = field(default_factory=dict)


def upstream(n: fx.Node, stop=()) -> set[fx.Node]:
    """n and every node it is computed from, not walking past nodes whose target is in `stop`."""
    seen, todo = {n}, [n]
    while todo:
        m = todo.pop()
        if m.target not in stop:
            for a in m.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    todo.append(a)
    return seen


def short_name(target: str) -> str:
    """Parameter / module path without the capture wrapper's prefix."""
    return target[len(WRAPPER_PREFIX):] if target.startswith(WRAPPER_PREFIX) else target


class IR:
    def __init__(self, gm: fx.GraphModule, info: ModelInfo, tokenizer=None):
        self.gm = gm
        self.info = info
        self.tokenizer = tokenizer
        self.passes_run: list[str] = []    # pipeline entries applied so far, as text
        self.stats: list[dict] = []         # per-pass results, in order
        self.extra_tensors: dict[str, torch.Tensor] = {}   # kept with the artifact, not read by the graph
        self.scratch: dict[Any, Any] = {}   # results passes share within one compile (not saved)
        self.stored: dict[str, Stored] = {}  # tensors left on disk until read (ir/store.py)
        self.spill: Spill | None = None      # where written tensors go past the memory budget
        self._analysis = None
        self._linears = None
        self._next_handle = 1 + max((n.meta.get(meta.HANDLE, 0) for n in gm.graph.nodes), default=0)

    def __getstate__(self):   # copies recompute analyses (they hold this graph's nodes); writes stay in memory
        return {**self.__dict__, "_analysis": None, "_linears": None, "spill": None}

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    # -- analysis, invalidated by every edit --------------------------------------------------
    @property
    def analysis(self):
        if self._analysis is None:
            from .analysis import analyze
            self._analysis = analyze(self)
        return self._analysis

    @property
    def linears(self):
        """Every linear and the lm_head (analysis.find_linears): what weight quantizers need, found
        on any captured graph, whatever the rest of its structure."""
        if self._linears is None:
            from .analysis import find_linears
            self._linears = find_linears(self)
        return self._linears

    def changed(self):
        """Call after editing the graph or its tensors: drops stale analysis, recompiles."""
        self._analysis = None
        self._linears = None
        self.gm.recompile()

    # -- nodes ---------------------------------------------------------------------------------
    def new_handle(self) -> int:
        h = self._next_handle
        self._next_handle += 1
        return h

    def stamp(self, node: fx.Node, like: fx.Node | None = None) -> fx.Node:
        """Give a node created by a pass a debug handle (inherited from `like` if given)."""
        if meta.HANDLE not in node.meta:
            node.meta[meta.HANDLE] = like.meta[meta.HANDLE] if like is not None else self.new_handle()
        return node

    # -- tensors held by the module (parameters and buffers, addressed by get_attr target) -----
    def tensor(self, target: str) -> torch.Tensor:
        """The tensor at `target`, read from disk when it is stored there (the caller frees it)."""
        if target in self.stored:
            return self.stored[target].read()
        owner, leaf = self._owner(target)
        return getattr(owner, leaf)

    def placeholder(self, target: str) -> torch.Tensor:
        """The tensor at `target` or, when it is on disk, an empty one of its shape and dtype."""
        owner, leaf = self._owner(target)
        return getattr(owner, leaf)

    def set_tensor(self, target: str, value: torch.Tensor | Stored):
        """Create or replace the tensor at `target` (stored as a buffer: nothing here trains); a
        `Stored` value stays on disk. Past the spill budget, written tensors move to disk."""
        old = self.stored.pop(target, None)
        if self.spill is not None:
            self.spill.forget(target, old)
        owner, leaf = self._owner(target, create=True)
        if leaf in owner._parameters:
            del owner._parameters[leaf]
        if isinstance(value, Stored):
            self.stored[target] = value
            owner.register_buffer(leaf, value.placeholder())
            return
        owner.register_buffer(leaf, value.detach().contiguous())
        if self.spill is not None:
            self.spill.wrote(self, target, value)

    def rewrite(self, target: str, fn: Callable[[torch.Tensor], torch.Tensor]):
        """Replace the tensor at `target` by fn(it), fn a function of that tensor alone (what else it
        needs, it holds). In memory that is done now; a tensor on disk stays there and fn is applied
        whenever it is read (`Rewritten`), so a rewrite costs nothing until then."""
        old = self.stored.get(target)
        if old is None:
            self.set_tensor(target, fn(self.tensor(target)))
        else:   # its file stays: the new entry reads it (a spill file goes once the target is replaced)
            self.stored[target] = Rewritten(old.file, old.key, old.shape, old.dtype, base=old, fn=fn)

    def del_tensor(self, target: str):
        old = self.stored.pop(target, None)
        if self.spill is not None:
            self.spill.forget(target, old)
        owner, leaf = self._owner(target)
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)

    def nbytes(self) -> int:
        """Bytes of every tensor the graph reads, on disk or in memory."""
        return sum(t.numel() * t.element_size() for t in map(self.placeholder, self.tensor_targets()))

    def whole(self, what: str):
        """Every tensor in memory, for work that needs the whole model at once (gradients through
        it). A model left on disk for its size is refused, naming `what`."""
        if self.stored and self.spill is not None:
            raise LowbitError(f"{what} needs the whole model in memory ({self.nbytes() / 2**20:,.0f} MiB in float32), "
                              "more than --max-memory allows")
        self.materialize()

    def materialize(self):
        """Read every stored tensor into memory (a model that fits runs as a plain module)."""
        for target, s in list(self.stored.items()):
            self.set_tensor(target, s.read())

    def param(self, target: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
        """Store `value` at `target` and return a get_attr node reading it."""
        self.set_tensor(target, value)
        return self.get_attr(target, before)

    def insert(self, op, args, kwargs=None, *, before: fx.Node | None = None, after: fx.Node | None = None,
               like: fx.Node | None = None, typ: str | None = None, replace: fx.Node | None = None,
               swap: tuple | None = None) -> fx.Node:
        """Insert a call of `op` before or after a node, with a debug handle (inherited from `like`)
        and a type string `typ`, then rewire: `replace` moves every use of a node to the new one and
        erases it (its type string, module path and quantization metadata carry over); `swap` =
        (old, users) makes `users` read the new node instead of `old` (users None: every user but
        the new node)."""
        like = like if like is not None else replace
        point = self.graph.inserting_before(before) if before is not None else self.graph.inserting_after(after)
        with point:
            n = self.graph.call_function(op, tuple(args), kwargs or {})
        if replace is not None:
            n.meta.update({k: like.meta[k] for k in (meta.TYPE, meta.MODULE, meta.QUANT) if k in like.meta})
        if typ is not None:
            n.meta[meta.TYPE] = typ
        self.stamp(n, like)
        if replace is not None:
            replace.replace_all_uses_with(n)
            self.graph.erase_node(replace)
        if swap is not None:
            old, users = swap
            if users is None:
                old.replace_all_uses_with(n, delete_user_cb=lambda u: u is not n)
            else:
                for u in users:
                    u.replace_input_with(old, n)
        return n

    def get_attr(self, target: str, before: fx.Node) -> fx.Node:
        """A get_attr node for `target` before `before`, reusing an existing one when there is one
        (moved up to `before` when it came later: a get_attr reads no other node)."""
        passed = False
        for n in self.graph.nodes:
            passed = passed or n is before
            if n.op == "get_attr" and n.target == target:
                if passed:
                    before.prepend(n)
                return n
        with self.graph.inserting_before(before):
            n = self.graph.get_attr(target)
        t = self.tensor(target)
        n.meta[meta.TYPE] = type_string(t)
        return self.stamp(n)

    def _owner(self, target: str, create: bool = False):
        *path, leaf = target.split(".")
        mod = self.gm
        for p in path:
            if not hasattr(mod, p):
                if not create:
                    raise KeyError(target)
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        return mod, leaf

    def fork(self) -> "IR":
        """An IR over a copy of the graph whose module shares this IR's tensors: passes run on the
        fork replace tensors (set_tensor) in the fork only."""
        import copy
        fork = IR(fx.GraphModule(self.gm, copy.deepcopy(self.graph)), self.info, self.tokenizer)
        fork.stored = dict(self.stored)
        return fork

    def constant(self, node: fx.Node) -> torch.Tensor:
        """The value of a node computed from stored tensors alone (e.g. a linear's weight through
        its dequantize and sparse-add ops)."""
        if node.op == "get_attr":
            return self.tensor(node.target)
        args = [self.constant(a) if isinstance(a, fx.Node) else a for a in node.args]
        return node.target(*args, **node.kwargs)

    def tensor_targets(self) -> list[str]:
        return list(dict.fromkeys(n.target for n in self.graph.nodes if n.op == "get_attr"))

    def referenced_tensors(self):
        """(target, tensor) for every tensor a get_attr node reads (what an artifact must store),
        one at a time: tensors on disk are read as they come."""
        return ((t, self.tensor(t)) for t in self.tensor_targets())

    def remove_dead(self) -> int:
        """Erase nodes without users (and the tensors only they read); returns how many."""
        removed = 0
        changed = True
        while changed:
            changed = False
            for n in reversed(list(self.graph.nodes)):
                if n.op in ("placeholder", "output") or n.users:
                    continue
                if n.op == "call_function" and _has_side_effects(n):
                    continue
                if n.op == "get_attr":
                    self.del_tensor(n.target)
                self.graph.erase_node(n)
                removed += 1
                changed = True
        return removed

    # -- running -------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return OnDemand(self).run(input_ids) if self.stored else self.gm(input_ids)


def _has_side_effects(n: fx.Node) -> bool:
    return getattr(n.target, "_schema", None) is not None and n.target._schema.is_mutable


_DTYPE_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
                torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.int8: "i8",
                torch.bool: "bool"}


def type_string(v) -> str:
    """'f32[s0,s1,576]' for a (fake) tensor; '' for anything else."""
    if isinstance(v, torch.Tensor):
        dims = ",".join(str(d) for d in v.shape)
        return f"{_DTYPE_SHORT.get(v.dtype, str(v.dtype))}[{dims}]"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(type_string(x) for x in v) + ")"
    if isinstance(v, torch.SymInt):
        return f"sym {v}"
    return ""
