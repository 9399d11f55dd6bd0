"""Hand-built graphs for pass tests in the style of TVM's: a tiny decoder written out by hand (one
attention block and one MLP block, dim 8), a `before` module, the `expected` module a pass should
turn it into, and one structural comparison. Exact, fast, no checkpoint.

Tiny(...) options say how each piece is written, so `expected` modules are the same class with the
pass's rewrite spelled out (a folded norm, a dequantized weight, an online Hadamard, ...)."""
import torch
import torch.nn.functional as F

from lowbit.ir import meta
from lowbit.ir.capture import capture
from lowbit.ir.graph import ModelInfo

D, HEADS, HD, FF, VOCAB = 8, 2, 4, 16, 32
NAMES = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb": (VOCAB, D), "q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "gate": (FF, D), "up": (FF, D),
              "down": (D, FF), "lm_head": (VOCAB, D), "n1": (D,), "n2": (D,), "nf": (D,)}
    w = {k: torch.randn(*s, generator=g) * (0.3 if len(s) == 2 else 0.2) for k, s in shapes.items()}
    for k in ("n1", "n2", "nf"):
        w[k] += 1.0
    return w


def rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Tiny(torch.nn.Module):
    """norm -> attention -> add, norm -> gated MLP -> add, final norm -> lm_head. Each piece can be
    written another way: norms=False (folded away), weight(name, m) (how a linear reads its weight;
    a parameter by default), hook(name, x) (what happens to a linear's input; called once per
    distinct input, as passes insert one op per input), head(name, t) (q, k, v after their head
    split), matmul(name, x, m) (the whole linear)."""

    def __init__(self, w, norms=True, weight=None, hook=None, head=None, matmul=None):
        super().__init__()
        self.emb = torch.nn.Parameter(w["emb"])
        for k in ("n1", "n2", "nf"):
            setattr(self, k, torch.nn.Parameter(w[k]))
        self.lin = torch.nn.ParameterDict({k: torch.nn.Parameter(w[k]) for k in NAMES})
        self.norms = norms
        self._weight = weight or (lambda name, m: m.lin[name])
        self._hook = hook or (lambda name, x: x)
        self._head = head or (lambda name, t: t)
        self._matmul = matmul or (lambda name, x, m: F.linear(x, m._weight(name, m)))
        self._seen = []

    def linear(self, name, x):
        hit = next((y for x0, y in self._seen if x0 is x), None)
        if hit is None:
            hit = self._hook(name, x)
            self._seen.append((x, hit))
        return self._matmul(name, hit, self)

    def norm(self, x, w):
        return rms(x) * w if self.norms else rms(x)

    def forward(self, input_ids, use_cache=False):
        self._seen = []
        h = F.embedding(input_ids, self.emb)
        x = self.norm(h, self.n1)
        b, s, _ = x.shape
        q, k, v = (self._head(n, self.linear(n, x).view(b, s, HEADS, HD).transpose(1, 2)) for n in ("q", "k", "v"))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, D)
        h = h + self.linear("o", a)
        x = self.norm(h, self.n2)
        h = h + self.linear("down", F.silu(self.linear("gate", x)) * self.linear("up", x))
        return self.linear("lm_head", self.norm(h, self.nf))


def folded(w) -> dict[str, torch.Tensor]:
    """The weights with each norm's scale folded into the linears reading it."""
    w = dict(w)
    for norm, readers in (("n1", ("q", "k", "v")), ("n2", ("gate", "up")), ("nf", ("lm_head",))):
        for r in readers:
            w[r] = w[r] * w[norm]
    return w


def ir_of(module):
    return capture(module, ModelInfo("tiny", VOCAB, 64, "tiny", ""), example_len=6)


def ops(ir) -> list[str]:
    """The graph as a sequence of op names (calls only; their inputs' order is the graph's)."""
    return [str(n.target) for n in ir.graph.nodes if n.op == "call_function"]


def assert_matches(after, expected, rtol: float = 1e-6):
    """The structural comparison: the same ops in the same order, and the same logits."""
    assert ops(after) == ops(expected), "\n".join(f"{a:50} {b}" for a, b in zip(ops(after), ops(expected)))
    x = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = expected(x)
    assert (after(x) - ref).abs().max() <= rtol * ref.abs().max()
    handles = [n.meta[meta.HANDLE] for n in after.graph.nodes]
    assert len(handles) == len(set(handles))
