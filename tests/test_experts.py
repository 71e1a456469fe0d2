"""moe.experts (the experts of an MoE layer over a Routing): the forward and every gradient
(hidden_states, gate_up_proj, down_proj, both biases, the routing weights and through them the
router logits) against the naive float64 per-token loop of mmkernels/reference.py, on the CPU path and
the Triton path; every activation, both gate/up layouts and gpt-oss's transposed weight views,
biases, capacity drops, the routing_weights override, storage dtypes, gradcheck, transformers'
GptOssExperts / MixtralExperts, and bad input.

The CPU path takes a broad matrix; the Triton interpreter (a 16x16x16 tl.dot costs ~ms) a curated
list of small cases that still covers every axis (``test_triton_matrix_covers_every_axis``).
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Optional, Tuple

import pytest
import torch

import mmkernels
from mmkernels import moe
from mmkernels import nn as mnn
from mmkernels import testing as mt
from mmkernels.reference import experts_ref, route_ref, routing_grad_magnitude_ref
from tests.conftest import DEVICE, backend_matrix, backends


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """Tiny matrices: torch's intra-op threads only add overhead, and on a loaded 2-core machine
    their spinning made single 16x24 GEMMs take ~20 ms (the module ran ~2x slower). Restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")
#: logit patterns: random; every token's first choice is one expert; the upper half of the
#: experts starved (they receive no token while k <= E/2)
PATTERNS = ("randn", "one-expert", "starved")
#: weight layouts: contiguous; gpt-oss's (E, H, 2I) / (E, I, H) parameters passed as
#: ``.transpose(1, 2)`` views; every tensor strided (column-major hidden_states, sliced weights,
#: biases and routing weights)
LAYOUTS = ("contiguous", "gptoss", "strided")


@dataclasses.dataclass(frozen=True)
class Case:
    T: int
    H: int
    I: int
    E: int
    k: int
    activation: str = "silu"
    bias: bool = False
    interleaved: bool = False
    layout: str = "contiguous"
    pattern: str = "randn"
    capacity_factor: Optional[float] = None
    override: bool = False          # routing_weights=<a leaf of our own> instead of routing.weights
    renormalize: bool = True
    dtype: torch.dtype = torch.float32
    swiglu: Optional[Tuple[float, float]] = None  # (alpha, limit) passed explicitly
    block_m: int = 64               # the routing's tile rows (the Triton path's row tile)

    @property
    def id(self) -> str:
        parts = [f"T{self.T}", f"H{self.H}", f"I{self.I}", f"E{self.E}", f"k{self.k}", self.activation]
        if self.swiglu is not None:
            parts.append(f"a{self.swiglu[0]}-l{self.swiglu[1]}")
        if self.bias:
            parts.append("bias")
        if self.interleaved:
            parts.append("interleaved")
        if self.layout != "contiguous":
            parts.append(self.layout)
        if self.pattern != "randn":
            parts.append(self.pattern)
        if self.capacity_factor is not None:
            parts.append(f"cap{self.capacity_factor}")
        if self.override:
            parts.append("override")
        if not self.renormalize:
            parts.append("nonorm")
        if self.dtype != torch.float32:
            parts.append(str(self.dtype).replace("torch.", ""))
        if self.block_m != 64:
            parts.append(f"bm{self.block_m}")
        return "-".join(parts)

    @property
    def logits_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32


def _view(layout: str, role: str):
    """(make the stored tensor from the logical value, view of the stored tensor as the logical value)."""
    if layout == "gptoss" and role in ("gate_up", "down"):
        return (lambda v: v.transpose(1, 2).contiguous()), (lambda s: s.transpose(1, 2))
    if layout == "strided":
        if role == "x":  # column-major
            return (lambda v: v.t().contiguous()), (lambda s: s.t())
        def store(v):
            big = torch.zeros(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype)
            big[..., 1::2] = v
            return big
        return store, (lambda s: s[..., 1::2])
    return (lambda v: v.clone()), (lambda s: s)


@dataclasses.dataclass
class Inputs:
    logits: torch.Tensor          # (T, E) leaf
    stores: dict                  # role -> leaf tensor (the stored layout), requires_grad
    views: dict                   # role -> function stored -> logical view
    dout: torch.Tensor            # (T, H)

    def arg(self, role):
        return None if role not in self.stores else self.views[role](self.stores[role])

    def grad(self, role):
        g = self.stores[role].grad
        return None if g is None else self.views[role](g)


def build(case: Case, device, requires_grad: bool = True) -> Inputs:
    """Deterministic inputs of a case on ``device``: the router logits, the tensors (stored in the
    case's layout; leaves requiring grad) and the incoming gradient of the output."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    T, H, I, E, k = case.T, case.H, case.I, case.E, case.k

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    logits = randn(T, E, scale=2.0)
    if case.pattern == "one-expert":
        logits[:, E // 2] += 50.0
    elif case.pattern == "starved":
        logits[:, (E + 1) // 2:] = -30.0
    # swiglu_oai with the default limit 7: gate / up spread wide enough that some clamp
    s1 = 5.0 if case.activation == "swiglu_oai" and case.swiglu is None else 1.0
    values = {
        "x": randn(T, H),
        "gate_up": randn(E, 2 * I, H, scale=s1 / H**0.5),
        "down": randn(E, H, I, scale=1.0 / I**0.5),
    }
    if case.bias:
        values["b1"] = randn(E, 2 * I, scale=0.5)
        values["b2"] = randn(E, H, scale=0.5)
    if case.override:
        values["w"] = torch.rand(T, k, generator=gen, dtype=torch.float64) + 0.25
    dout = randn(T, H)

    stores, views = {}, {}
    for role, v in values.items():
        store, view = _view(case.layout, role)
        dtype = case.logits_dtype if role == "w" else case.dtype
        stores[role] = store(v.to(dtype)).to(device).requires_grad_(requires_grad)
        views[role] = view
    logits = logits.to(case.logits_dtype).to(device).requires_grad_(requires_grad)
    return Inputs(logits, stores, views, dout.to(case.dtype).to(device))


def run_experts(case: Case, inp: Inputs, backend: str):
    """(routing, out) of moe.route + moe.experts on the backend."""
    kw = {}
    if case.swiglu is not None:
        kw = {"swiglu_alpha": case.swiglu[0], "swiglu_limit": case.swiglu[1]}
    with mmkernels.use_backend(backend):
        r = moe.route(inp.logits, case.k, renormalize=case.renormalize, capacity_factor=case.capacity_factor,
                      block_m=case.block_m)
        out = moe.experts(inp.arg("x"), r, inp.arg("gate_up"), inp.arg("down"), activation=case.activation,
                          gate_up_bias=inp.arg("b1"), down_bias=inp.arg("b2"), interleaved=case.interleaved,
                          routing_weights=inp.arg("w"), **kw)
    return r, out


def reference(case: Case, inp: Inputs):
    """(route_ref dict, out, {role: grad}, d logits, magnitude of d logits), all float64; the
    gradients by autograd through experts_ref (and routing_weights_ref for the logits)."""
    logits = inp.logits.detach().cpu().clone().requires_grad_()
    ref = route_ref(logits, case.k, renormalize=case.renormalize, capacity_factor=case.capacity_factor,
                    block_m=case.block_m)
    leaves = {role: inp.arg(role).detach().cpu().double().clone().requires_grad_() for role in inp.stores}
    weights = leaves["w"] if case.override else ref["weights"]
    if not case.override:
        weights.retain_grad()
    alpha, limit = case.swiglu if case.swiglu is not None else (1.702, 7.0)
    out = experts_ref(leaves["x"], weights, ref["expert_ids"], ref["dropped"], leaves["gate_up"], leaves["down"],
                      leaves.get("b1"), leaves.get("b2"), case.activation, case.interleaved, alpha, limit)
    out.backward(inp.dout.cpu().double())
    grads = {role: (t.grad if t.grad is not None else torch.zeros_like(t)) for role, t in leaves.items()}
    dlogits = mag = None
    if not case.override:
        dlogits = logits.grad if logits.grad is not None else torch.zeros_like(logits)
        dw = weights.grad if weights.grad is not None else torch.zeros_like(weights)
        mag = routing_grad_magnitude_ref(logits, ref["expert_ids"], dw, renormalize=case.renormalize)
    return ref, out.detach(), grads, dlogits, mag


#: bf16 results of the Triton path: the table's bf16 max bound, twice its rms bound (see check_case)
BF16_CHAIN = mt.Tolerance(3e-2, 1.6e-2)

ROLE_NAMES = {"x": "d(hidden_states)", "gate_up": "d(gate_up_proj)", "down": "d(down_proj)", "b1": "d(gate_up_bias)",
              "b2": "d(down_bias)", "w": "d(routing_weights)"}


def check_case(case: Case, backend: str, device):
    inp = build(case, device)
    before = {role: t.detach().clone() for role, t in inp.stores.items()}
    r, out = run_experts(case, inp, backend)
    assert out.shape == (case.T, case.H) and out.dtype == case.dtype and out.device == inp.logits.device
    out.backward(inp.dout)
    for role, t in inp.stores.items():
        assert torch.equal(t.detach(), before[role]), f"experts mutated {role}"

    ref, want, grads, dlogits, mag = reference(case, inp)
    assert torch.equal(r.expert_ids.cpu(), ref["expert_ids"]) and torch.equal(r.dropped.cpu(), ref["dropped"])
    if case.pattern == "one-expert":
        assert (r.expert_ids[:, 0] == case.E // 2).all(), "the case should send every token to one expert"
    if case.pattern == "starved" and case.E > 1:
        assert (r.counts.cpu()[(case.E + 1) // 2:] == 0).all(), "the case should starve the upper experts"
    if case.capacity_factor is not None:
        assert r.dropped.any(), "the case should drop slots"

    tol_dtype = case.dtype  # results made from case.dtype storage: that dtype's bound (the weights' too)
    # the Triton path keeps its intermediates (pre-activation, activation, dh, per-row dx) in the
    # storage dtype, as autograd through torch would: for 16-bit storage a gradient passes through
    # two or three of those roundings, ~2x one rounding's rms
    tol = BF16_CHAIN if backend == "triton" and case.dtype == torch.bfloat16 else None
    mt.assert_close(out, want, backend=backend, dtype=tol_dtype, tol=tol, what="out")
    for role in inp.stores:
        got = inp.grad(role)
        assert got is not None, f"{ROLE_NAMES[role]} is None"
        assert got.dtype == inp.stores[role].dtype
        mt.assert_close(got, grads[role], backend=backend, dtype=tol_dtype, tol=tol, what=ROLE_NAMES[role])
        if case.layout == "strided" and role != "x":   # the gaps of the sliced storage get nothing
            assert not inp.stores[role].grad[..., 0::2].any(), f"{ROLE_NAMES[role]} wrote between the slices"
    if case.override:
        assert inp.logits.grad is None or not inp.logits.grad.any(), "routing.weights got a gradient it did not use"
    else:
        assert inp.logits.grad is not None and inp.logits.grad.dtype == case.logits_dtype
        mt.assert_close(inp.logits.grad, dlogits, backend=backend, dtype=tol_dtype, magnitude=mag, tol=tol,
                        what="d(router_logits)")


# ------------------------------------------------------------------------------------------------
# the matrix
# ------------------------------------------------------------------------------------------------

#: (T, H, I, E, k): T in {1, 3, 64}, H and I not multiples of 16, E in {1, 4, 7}, k in {1, 2, 3}
SHAPES = [(1, 24, 40, 4, 2), (3, 40, 24, 7, 3), (64, 24, 40, 4, 1), (3, 24, 40, 1, 1), (64, 40, 24, 7, 2),
          (1, 40, 24, 7, 3), (64, 24, 40, 1, 1)]

CPU_CASES = [Case(*shape, activation=a, bias=b, interleaved=il)
             for shape in SHAPES[:3] for a in ACTIVATIONS for b in (False, True) for il in (False, True)]
CPU_CASES += [Case(*shape, activation=a, bias=True) for shape in SHAPES[3:] for a in ("silu", "swiglu_oai")]
CPU_CASES += [
    # gpt-oss: interleaved, transposed views, biases, clamped SwiGLU, softmax over the chosen
    Case(64, 40, 24, 4, 2, "swiglu_oai", bias=True, interleaved=True, layout="gptoss"),
    Case(3, 24, 40, 7, 3, "swiglu_oai", bias=True, interleaved=True, layout="gptoss", swiglu=(1.0, 0.5)),
    Case(3, 24, 40, 7, 3, "silu", layout="gptoss"),
    Case(3, 40, 24, 4, 2, "gelu", bias=True, interleaved=True, layout="strided"),
    Case(64, 24, 40, 7, 2, "swiglu_oai", bias=True, layout="strided", override=True),
    # one expert takes every token (k = 1: the others take none); starved experts
    Case(64, 24, 40, 7, 1, "silu", bias=True, pattern="one-expert"),
    Case(64, 40, 24, 7, 2, "gelu_tanh", pattern="one-expert", renormalize=False),
    Case(3, 24, 40, 7, 3, "relu", bias=True, pattern="starved"),
    Case(64, 24, 40, 7, 3, "swiglu_oai", pattern="starved", interleaved=True),
    # capacity drops (first-come per expert), with and without the override
    Case(64, 24, 40, 4, 2, "silu", bias=True, capacity_factor=0.5),
    Case(64, 40, 24, 7, 1, "swiglu_oai", bias=True, interleaved=True, capacity_factor=0.5, renormalize=False),
    Case(3, 24, 40, 7, 3, "gelu", capacity_factor=0.5, override=True),
    Case(64, 24, 40, 7, 1, "silu", pattern="one-expert", capacity_factor=0.5),
    # routing_weights override; full (not renormalised) probabilities give k = 1 a logit gradient
    Case(64, 24, 40, 4, 2, "silu", bias=True, override=True),
    Case(1, 40, 24, 7, 3, "relu", interleaved=True, override=True),
    Case(3, 24, 40, 4, 1, "silu", bias=True, renormalize=False),
    Case(64, 40, 24, 7, 3, "gelu", renormalize=False),
    # custom gpt-oss constants
    Case(64, 24, 40, 4, 2, "swiglu_oai", swiglu=(1.0, 1.5), bias=True),
]
#: storage dtypes, both backends (fp64: the tight bound; half types: their table bound)
DTYPE_CASES = [
    Case(3, 24, 40, 4, 2, "silu", bias=True, dtype=torch.float64),
    Case(3, 40, 24, 7, 3, "swiglu_oai", bias=True, interleaved=True, layout="gptoss", dtype=torch.float64,
         capacity_factor=0.5),
]
HALF_CASES = [
    Case(64, 24, 40, 7, 2, "silu", bias=True, dtype=torch.bfloat16),
    Case(3, 40, 24, 4, 2, "swiglu_oai", bias=True, interleaved=True, layout="gptoss", dtype=torch.bfloat16),
    Case(64, 40, 24, 4, 3, "gelu", dtype=torch.float16, capacity_factor=0.5),
    Case(3, 24, 40, 7, 1, "gelu_tanh", bias=True, dtype=torch.float16, override=True),
]
#: other tile tables of the routing (block_m 16, 32, 128): rows of one expert across several
#: tiles, several experts in the tiles of one launch
BLOCK_CASES = [
    Case(64, 24, 40, 4, 2, "silu", bias=True, block_m=16),
    Case(64, 40, 24, 7, 3, "swiglu_oai", bias=True, interleaved=True, capacity_factor=0.5, block_m=32),
    Case(64, 24, 40, 1, 1, "gelu", block_m=128),
]
CPU_CASES += DTYPE_CASES + HALF_CASES + BLOCK_CASES

#: the interpreter's list: every T, E, k, activation, layout, pattern, dtype, bias / override /
#: capacity / interleaving at least once, H and I never multiples of 16
TRITON_CASES = [
    Case(1, 24, 40, 4, 2, "silu"),
    Case(3, 40, 24, 7, 3, "gelu", bias=True, interleaved=True),
    Case(3, 24, 40, 1, 1, "gelu_tanh", bias=True),
    Case(3, 24, 40, 4, 1, "relu", renormalize=False, layout="strided"),
    Case(3, 40, 24, 7, 2, "swiglu_oai", bias=True, interleaved=True, layout="gptoss"),
    Case(64, 24, 40, 4, 2, "silu", bias=True, capacity_factor=0.5),
    Case(64, 24, 40, 7, 1, "swiglu_oai", pattern="one-expert", override=True),
    Case(3, 24, 40, 7, 3, "silu", bias=True, pattern="starved", capacity_factor=0.5),
    Case(3, 24, 40, 4, 2, "swiglu_oai", bias=True, interleaved=True, swiglu=(1.0, 0.5)),
    Case(3, 24, 40, 4, 2, "silu", bias=True, dtype=torch.float64),
    Case(3, 40, 24, 4, 2, "silu", bias=True, dtype=torch.bfloat16),
    Case(3, 24, 40, 7, 3, "gelu", dtype=torch.float16, override=True),
    Case(64, 40, 24, 7, 3, "swiglu_oai", bias=True, interleaved=True, layout="gptoss", capacity_factor=0.5),
    Case(64, 24, 40, 4, 2, "relu", interleaved=True, block_m=16),
    Case(64, 40, 24, 7, 2, "gelu_tanh", bias=True, pattern="starved", block_m=32, renormalize=False),
]


@pytest.mark.parametrize("backend,device,case", backend_matrix({"cpu": CPU_CASES, "triton": TRITON_CASES}))
def test_experts_against_reference(backend, device, case, poison_outputs):
    """Forward and every gradient against the float64 per-token loop; the inputs are not mutated."""
    check_case(case, backend, device)


def test_triton_matrix_covers_every_axis():
    def seen(cases, axis):
        return {getattr(c, axis) for c in cases}

    for cases in (TRITON_CASES, CPU_CASES):
        assert seen(cases, "T") >= {1, 3, 64} and seen(cases, "E") >= {1, 4, 7} and seen(cases, "k") >= {1, 2, 3}
        assert seen(cases, "activation") == set(ACTIVATIONS) and seen(cases, "layout") == set(LAYOUTS)
        assert seen(cases, "pattern") == set(PATTERNS)
        assert seen(cases, "dtype") == {torch.float16, torch.bfloat16, torch.float32, torch.float64}
        for axis in ("bias", "interleaved", "override", "renormalize"):
            assert seen(cases, axis) == {False, True}, axis
        assert seen(cases, "capacity_factor") == {None, 0.5}
        assert not any(c.H % 16 == 0 or c.I % 16 == 0 for c in cases)
    assert {c.block_m for c in TRITON_CASES} >= {16, 32, 64}
    assert all(c.T <= 64 and c.H <= 48 and c.I <= 48 for c in TRITON_CASES)


# ------------------------------------------------------------------------------------------------
# specific behaviours
# ------------------------------------------------------------------------------------------------

def _small(device, T=5, H=24, I=40, E=4, k=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(device, dtype)
    gu = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(device, dtype)
    dn = (torch.randn(E, H, I, generator=gen) / I**0.5).to(device, dtype)
    b1 = (torch.randn(E, 2 * I, generator=gen) * 0.5).to(device, dtype)
    b2 = (torch.randn(E, H, generator=gen) * 0.5).to(device, dtype)
    logits = torch.randn(T, E, generator=gen).to(device)
    return x, gu, dn, b1, b2, logits


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_dropped_tokens_get_nothing(backend, device, poison_outputs):
    """Every token prefers expert 2, capacity 1 (k = 1): token 0 keeps it, the others are dropped:
    their output rows and input gradients are exactly zero; only expert 2 gets weight gradients."""
    x, gu, dn, b1, b2, _ = _small(device, T=6, E=4, k=1)
    logits = torch.zeros(6, 4, device=device)
    logits[:, 2] = 5.0
    leaves = [t.clone().requires_grad_() for t in (x, gu, dn, b1, b2)]
    with mmkernels.use_backend(backend):
        r = moe.route(logits, 1, capacity_factor=0.25)     # capacity ceil(0.25 * 6 / 4) = 1
        out = moe.experts(leaves[0], r, leaves[1], leaves[2], gate_up_bias=leaves[3], down_bias=leaves[4])
        out.sum().backward()
    assert r.capacity == 1 and r.dropped.cpu().flatten().tolist() == [False] + [True] * 5
    assert not out[1:].any() and out[0].abs().sum() > 0
    assert not leaves[0].grad[1:].any() and leaves[0].grad[0].abs().sum() > 0
    for leaf in leaves[1:]:
        others = torch.cat([leaf.grad[:2], leaf.grad[3:]])
        assert not others.any() and leaf.grad[2].abs().sum() > 0


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_no_tokens(backend, device, poison_outputs):
    """T = 0 gives a (0, H) output that is part of the graph (an empty shard of a batch still
    back-propagates: the parameters get zero or no gradients, not an error)."""
    x, gu, dn, b1, b2, logits = _small(device, T=0)
    leaves = [t.clone().requires_grad_() for t in (x, gu, dn, b1, b2)]
    with mmkernels.use_backend(backend):
        r = moe.route(logits, 2)
        out = moe.experts(leaves[0], r, leaves[1], leaves[2], gate_up_bias=leaves[3], down_bias=leaves[4])
        assert out.shape == (0, 24) and out.dtype == x.dtype
        assert out.requires_grad, "an empty batch must still give the parameters (zero) gradients"
        out.sum().backward()
    for leaf in leaves[1:]:
        assert leaf.grad is None or not leaf.grad.any()


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_partial_requires_grad_and_no_grad(backend, device):
    """Only some inputs requiring grad get the same gradients as with all of them; under no_grad
    the output is the same and nothing is recorded."""
    x, gu, dn, b1, b2, logits = _small(device, seed=3)
    dout = torch.randn(5, 24, generator=torch.Generator().manual_seed(4)).to(device)

    def run(flags, grad_mode=True):
        leaves = [t.clone().requires_grad_(f) for t, f in zip((x, gu, dn, b1, b2, logits), flags)]
        with mmkernels.use_backend(backend), torch.set_grad_enabled(grad_mode):
            r = moe.route(leaves[5], 2)
            out = moe.experts(leaves[0], r, leaves[1], leaves[2], gate_up_bias=leaves[3], down_bias=leaves[4])
        if out.requires_grad:
            out.backward(dout)
        return out.detach(), [t.grad for t in leaves]

    full_out, full = run([True] * 6)
    for i in range(6):
        flags = [j == i for j in range(6)]
        out, grads = run(flags)
        torch.testing.assert_close(out, full_out, rtol=0, atol=0)
        torch.testing.assert_close(grads[i], full[i], rtol=1e-6, atol=1e-6)
        assert all(g is None for j, g in enumerate(grads) if j != i)
    out, _ = run([True] * 6, grad_mode=False)
    assert not out.requires_grad
    torch.testing.assert_close(out, full_out, rtol=0, atol=0)


def test_gradcheck_float64():
    """torch.autograd.gradcheck of every differentiable input (CPU path, small sizes: the
    interpreter would need hundreds of launches), both layouts and the clamped SwiGLU with a
    limit that clamps; through route's weights and with the override."""
    gen = torch.Generator().manual_seed(21)
    T, H, I, E, k = 4, 5, 3, 3, 2
    for activation, interleaved, kw in (("silu", False, {}), ("gelu_tanh", True, {}),
                                        ("swiglu_oai", True, {"swiglu_limit": 0.6, "swiglu_alpha": 1.3})):
        args = [torch.randn(T, H, generator=gen, dtype=torch.float64),
                torch.randn(E, 2 * I, H, generator=gen, dtype=torch.float64),
                torch.randn(E, H, I, generator=gen, dtype=torch.float64),
                torch.randn(E, 2 * I, generator=gen, dtype=torch.float64),
                torch.randn(E, H, generator=gen, dtype=torch.float64),
                torch.randn(T, E, generator=gen, dtype=torch.float64)]
        args = [a.requires_grad_() for a in args]

        def f(x, gu, dn, b1, b2, logits):
            r = moe.route(logits, k, renormalize=False)
            return moe.experts(x, r, gu, dn, activation=activation, interleaved=interleaved, gate_up_bias=b1,
                               down_bias=b2, **kw)

        def g(x, gu, w, logits):
            r = moe.route(logits.detach(), k)
            return moe.experts(x, r, gu, args[2], activation=activation, interleaved=interleaved,
                               routing_weights=w, **kw)

        with mmkernels.use_backend("cpu"):
            assert torch.autograd.gradcheck(f, tuple(args)), activation
            w = torch.rand(T, k, generator=gen, dtype=torch.float64).requires_grad_()
            assert torch.autograd.gradcheck(g, (args[0], args[1], w, args[5])), activation


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_swiglu_oai_clamps(backend, device):
    """gpt-oss's clamps take effect (gate above limit, up outside ±limit): the output differs from
    the unclamped SwiGLU and matches the reference; alpha and limit are honoured."""
    case = Case(3, 24, 40, 4, 2, "swiglu_oai", bias=True, interleaved=True, swiglu=(1.0, 0.5))
    inp = build(case, device, requires_grad=False)
    h = torch.einsum("th,eih->tei", inp.arg("x").double().cpu(), inp.arg("gate_up").double().cpu())
    assert (h[..., 0::2] > 0.5).any() and (h[..., 1::2].abs() > 0.5).any(), "the case should clamp"
    _, out = run_experts(case, inp, backend)
    want = reference(case, build(case, device))[1]
    mt.assert_close(out, want, backend=backend, what="out")
    _, loose = run_experts(dataclasses.replace(case, swiglu=(1.0, 100.0)), inp, backend)
    assert not torch.allclose(out, loose)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_transposed_view_equals_contiguous(backend, device):
    """gpt-oss's (E, H, 2I) / (E, I, H) parameters as .transpose(1, 2) views give exactly what their
    contiguous (E, 2I, H) / (E, H, I) copies give, in the forward and the gradients."""
    x, gu, dn, b1, b2, logits = _small(device, T=7, E=4, seed=5)
    gu_param = gu.transpose(1, 2).contiguous().requires_grad_()
    dn_param = dn.transpose(1, 2).contiguous().requires_grad_()
    gu_c, dn_c = gu.clone().requires_grad_(), dn.clone().requires_grad_()
    kw = {"activation": "swiglu_oai", "interleaved": True, "gate_up_bias": b1, "down_bias": b2}
    with mmkernels.use_backend(backend):
        r = moe.route(logits, 2, softmax_after_topk=True)
        a = moe.experts(x, r, gu_param.transpose(1, 2), dn_param.transpose(1, 2), **kw)
        b = moe.experts(x, r, gu_c, dn_c, **kw)
        a.sum().backward()
        b.sum().backward()
    mt.assert_close(a, b.double(), backend=backend, what="out")
    mt.assert_close(gu_param.grad.transpose(1, 2), gu_c.grad.double(), backend=backend, what="d(gate_up_proj)")
    mt.assert_close(dn_param.grad.transpose(1, 2), dn_c.grad.double(), backend=backend, what="d(down_proj)")


# ------------------------------------------------------------------------------------------------
# transformers' expert modules (eager implementations)
# ------------------------------------------------------------------------------------------------

def _hf_gptoss(H, I, E, k):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
    return GptOssExperts(cfg)


def _hf_mixtral(H, I, E, k):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
    return MixtralExperts(cfg)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("model", ["gpt-oss", "mixtral"])
def test_matches_transformers(model, backend, device):
    """moe.experts on the parameters of transformers' GptOssExperts / MixtralExperts (passed as
    they are stored: gpt-oss's transposed ones as views) equals their forward and gradients."""
    pytest.importorskip("transformers")
    T, H, I, E, k = 9, 24, 40, 4, 2
    gen = torch.Generator().manual_seed(8)
    module = (_hf_gptoss if model == "gpt-oss" else _hf_mixtral)(H, I, E, k)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 2 else 3.0 / H**0.5))
    module = module.to(device)
    x = torch.randn(T, H, generator=gen).to(device)
    logits = torch.randn(T, E, generator=gen).to(device)
    x_hf, x_mm = x.clone().requires_grad_(), x.clone().requires_grad_()
    with mmkernels.use_backend(backend):
        r = moe.route(logits, k)
        if model == "gpt-oss":
            want = module(x_hf, router_indices=r.expert_ids.long(), routing_weights=r.weights)
            got = moe.experts(x_mm, r, module.gate_up_proj.transpose(1, 2), module.down_proj.transpose(1, 2),
                              activation="swiglu_oai", interleaved=True, gate_up_bias=module.gate_up_proj_bias,
                              down_bias=module.down_proj_bias)
        else:
            want = module(x_hf, r.expert_ids.long(), r.weights)
            got = moe.experts(x_mm, r, module.gate_up_proj, module.down_proj, activation="silu")
    dout = torch.randn(T, H, generator=gen).to(device)
    hf_grads = torch.autograd.grad(want, [x_hf] + list(module.parameters()), dout)
    mm_grads = torch.autograd.grad(got, [x_mm] + list(module.parameters()), dout)
    mt.assert_close(got, want.double(), backend=backend, what="out")
    for name, a, b in zip(["x"] + [n for n, _ in module.named_parameters()], mm_grads, hf_grads):
        mt.assert_close(a, b.double(), backend=backend, what=f"d({name})")


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

T0, H0, I0, E0, K0 = 5, 24, 40, 4, 2


def _call(**over):
    """A call of moe.experts on ``device`` (fp32) with one argument replaced (a CPU tensor moves to
    ``device``; a meta tensor stands for another device)."""

    def f(device):
        x, gu, dn, b1, b2, logits = _small(device, T=T0, H=H0, I=I0, E=E0)
        args = {"hidden_states": x, "routing": moe.route(logits, K0), "gate_up_proj": gu, "down_proj": dn}
        kwargs = {"gate_up_bias": b1, "down_bias": b2}
        for name, v in over.items():
            v = v(args["routing"]) if callable(v) else v
            if isinstance(v, torch.Tensor) and v.device.type == "cpu":
                v = v.to(device)
            (args if name in args else kwargs)[name] = v
        return moe.experts(args["hidden_states"], args["routing"], args["gate_up_proj"], args["down_proj"], **kwargs)

    return f


def _meta(*shape):
    return torch.empty(*shape, device="meta")


BAD_INPUT = [
    # shapes that disagree with H / E / I / T / k
    ("gate_up-wrong-E", _call(gate_up_proj=torch.randn(E0 + 1, 2 * I0, H0)), ValueError, "gate_up_proj"),
    ("gate_up-wrong-H", _call(gate_up_proj=torch.randn(E0, 2 * I0, H0 + 1)), ValueError, "gate_up_proj"),
    ("gate_up-odd-2I", _call(gate_up_proj=torch.randn(E0, 2 * I0 + 1, H0)), ValueError, "gate_up_proj"),
    ("gate_up-2d", _call(gate_up_proj=torch.randn(2 * I0, H0)), ValueError, "gate_up_proj"),
    ("gate_up-untransposed-gptoss", _call(gate_up_proj=torch.randn(E0, H0, 2 * I0)), ValueError, "gate_up_proj"),
    ("down-wrong-E", _call(down_proj=torch.randn(E0 + 1, H0, I0)), ValueError, "down_proj"),
    ("down-wrong-H", _call(down_proj=torch.randn(E0, H0 + 1, I0)), ValueError, "down_proj"),
    ("down-wrong-I", _call(down_proj=torch.randn(E0, H0, I0 + 1)), ValueError, "down_proj"),
    ("down-untransposed-gptoss", _call(down_proj=torch.randn(E0, I0, H0)), ValueError, "down_proj"),
    ("gate_up_bias-shape", _call(gate_up_bias=torch.randn(E0, I0)), ValueError, "gate_up_bias"),
    ("gate_up_bias-1d", _call(gate_up_bias=torch.randn(2 * I0)), ValueError, "gate_up_bias"),
    ("down_bias-shape", _call(down_bias=torch.randn(E0 + 1, H0)), ValueError, "down_bias"),
    ("down_bias-1d", _call(down_bias=torch.randn(H0)), ValueError, "down_bias"),
    ("hidden-wrong-T", _call(hidden_states=torch.randn(T0 + 1, H0)), ValueError, "routing|hidden_states"),
    ("hidden-1d", _call(hidden_states=torch.randn(H0)), ValueError, "hidden_states"),
    ("hidden-3d", _call(hidden_states=torch.randn(1, T0, H0)), ValueError, "hidden_states"),
    ("routing_weights-shape", _call(routing_weights=torch.rand(T0, K0 + 1)), ValueError, "routing_weights"),
    ("routing_weights-int", _call(routing_weights=torch.ones(T0, K0, dtype=torch.int64)), TypeError,
     "routing_weights"),
    # dtypes
    ("hidden-int", _call(hidden_states=torch.ones(T0, H0, dtype=torch.int32)), TypeError, "hidden_states"),
    ("gate_up-f64", _call(gate_up_proj=torch.randn(E0, 2 * I0, H0, dtype=torch.float64)), TypeError, "gate_up_proj"),
    ("down-f16", _call(down_proj=torch.randn(E0, H0, I0).half()), TypeError, "down_proj"),
    ("gate_up_bias-bf16", _call(gate_up_bias=torch.randn(E0, 2 * I0).bfloat16()), TypeError, "gate_up_bias"),
    ("down_bias-f64", _call(down_bias=torch.randn(E0, H0, dtype=torch.float64)), TypeError, "down_bias"),
    # devices (meta stands for a second device)
    ("gate_up-meta", _call(gate_up_proj=_meta(E0, 2 * I0, H0)), ValueError, "gate_up_proj"),
    ("down-meta", _call(down_proj=_meta(E0, H0, I0)), ValueError, "down_proj"),
    ("gate_up_bias-meta", _call(gate_up_bias=_meta(E0, 2 * I0)), ValueError, "gate_up_bias"),
    ("down_bias-meta", _call(down_bias=_meta(E0, H0)), ValueError, "down_bias"),
    ("routing_weights-meta", _call(routing_weights=_meta(T0, K0)), ValueError, "routing_weights"),
    ("hidden-meta", _call(hidden_states=_meta(T0, H0)), ValueError, "hidden_states"),
    # types and options
    ("routing-tuple", _call(routing=lambda r: (r.weights, r.expert_ids)), TypeError, "routing"),
    ("routing-tensor", _call(routing=lambda r: r.weights), TypeError, "routing"),
    ("routing-None", _call(routing=None), TypeError, "routing"),
    ("gate_up-list", _call(gate_up_proj=[[0.0]]), TypeError, "gate_up_proj"),
    ("down-ndarray", _call(down_proj=torch.randn(E0, H0, I0).numpy()), TypeError, "down_proj"),
    ("gate_up_bias-float", _call(gate_up_bias=0.5), TypeError, "gate_up_bias"),
    ("activation-unknown", _call(activation="swish"), ValueError, "activation"),
    ("activation-case", _call(activation="SiLU"), ValueError, "activation"),
    ("activation-None", _call(activation=None), (TypeError, ValueError), "activation"),
    ("swiglu_limit-with-silu", _call(swiglu_limit=7.0), ValueError, "swiglu"),
    ("swiglu_alpha-with-gelu", _call(activation="gelu", swiglu_alpha=1.0), ValueError, "swiglu"),
]


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("call,exc,match", [pytest.param(*p[1:], id=p[0]) for p in BAD_INPUT])
def test_bad_input(call, exc, match, backend, device):
    with mmkernels.use_backend(backend), pytest.raises(exc, match=match):
        call(device)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_routing_of_other_device(backend, device):
    """A Routing made on another device than hidden_states' (meta tensors standing for it)."""
    x, gu, dn, _, _, logits = _small("cpu")
    r = moe.route(logits, 2)
    meta = dataclasses.replace(r, **{f.name: getattr(r, f.name).to("meta") for f in dataclasses.fields(r)
                                     if isinstance(getattr(r, f.name), torch.Tensor)})
    with mmkernels.use_backend(backend), pytest.raises(ValueError, match="routing"):
        moe.experts(x, meta, gu, dn)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("block_m", [1, 2, 8])
def test_small_block_m(block_m, backend, device):
    """A routing with tiles smaller than one tl.dot tile either runs correctly or is refused with a
    ValueError naming block_m (the Triton path's documented limit); never a wrong result."""
    case = Case(5, 24, 40, 4, 2, "silu", bias=True, block_m=block_m)
    inp = build(case, device, requires_grad=False)
    try:
        _, out = run_experts(case, inp, backend)
    except ValueError as e:
        assert "block_m" in str(e)
        return
    mt.assert_close(out, reference(case, build(case, device))[1], backend=backend, what="out")


# ------------------------------------------------------------------------------------------------
# decode: the down GEMM split over its reduction
# ------------------------------------------------------------------------------------------------

@pytest.mark.interp
@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_k_down_gemm_against_reference(splits, dtype, poison_outputs):
    """The forward's down GEMM split into ``splits`` partial-sum planes (decode) and the combine
    summing them in order: equal to the float64 reference, and bitwise equal on a rerun."""
    from mmkernels.ops import experts as X

    T, H, I, E, k = 5, 24, 72, 4, 2
    x, gu, dn, b1, b2, logits = _small(DEVICE, T=T, H=H, I=I, E=E, k=k, dtype=dtype)
    with mmkernels.use_backend("triton"):
        r = moe.route(logits, k, block_m=16)
        w = r.weights.to(dtype)
        spec = X.ExpertSpec()
        outs = [X.triton_forward(x, w, gu, dn, b1, b2, r, spec, save_h=False, split_k=splits)[0] for _ in range(2)]
    ref = experts_ref(x, r.weights, r.expert_ids, r.dropped, gu, dn, b1, b2)
    mt.assert_close(outs[0], ref, backend="triton")
    assert torch.equal(outs[0], outs[1])


def test_down_splits_fill_a_wave_only_at_decode():
    from mmkernels.ops import experts as X

    c = X.resolve_config("down", 16, 4096, 14336, torch.bfloat16, 9)  # Mixtral's down GEMM at decode, sm_90
    one = moe.route(torch.randn(1, 8), 2, block_m=16)                  # one token: two tiles x 64 columns
    batch = moe.route(torch.randn(64, 8), 2, block_m=16)               # 8 tiles x 64 columns: a wave
    train = moe.route(torch.randn(16384, 8), 2, block_m=128)
    assert X.down_splits(one, 4096, 14336, c, 132) == 2
    assert X.down_splits(batch, 4096, 14336, c, 132) == 1
    assert X.down_splits(train, 4096, 14336, c, 132) == 1
    assert X.down_splits(one, 4096, 128, c, 132) == 1                  # too short a reduction to split


#: moe_layer cases: (route options, activation, biases)
LAYER_CASES = {
    "mixtral": (dict(), "silu", False),
    "sigmoid-groups": (dict(scoring="sigmoid", n_groups=2, topk_groups=1, routed_scaling=2.5, renormalize=True),
                       "gelu", False),
    "capacity-bias": (dict(capacity_factor=0.6, renormalize=False), "swiglu_oai", True),
}


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_moe_layer_one_node_equals_route_then_experts(case, backend, device):
    """The fused autograd node of nn.MoE's eager path (ops.moe_layer) gives bit for bit what
    route then experts give: output, counts and every gradient — the logits' included, with a
    second loss on the logits (a balancing loss) adding its own gradient."""
    from mmkernels.ops.moe_layer import moe_layer

    route_kw, act, bias = LAYER_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    T, H, I, E, k = 12, 16, 8, 4, 2
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device)  # noqa: E731
    leaves = [r(T, E, scale=2.0), r(T, H), r(E, 2 * I, H, scale=0.3), r(E, H, I, scale=0.3)]
    leaves += [r(E, 2 * I, scale=0.3), r(E, H, scale=0.3)] if bias else [None, None]
    dy, dl = r(T, H), r(T, E)
    results = []
    with mmkernels.use_backend(backend):
        for fused in (True, False):
            args = [t.clone().requires_grad_() if t is not None else None for t in leaves]
            logits, x, gu, dn, b1, b2 = args
            if fused:
                out, counts = moe_layer(logits, x, gu, dn, k, block_m=16, activation=act, gate_up_bias=b1,
                                        down_bias=b2, **route_kw)
                assert type(out.grad_fn).__name__ == "MoELayerFunctionBackward"
            else:
                routing = moe.route(logits, k, block_m=16, **route_kw)
                out, counts = moe.experts(x, routing, gu, dn, activation=act, gate_up_bias=b1,
                                          down_bias=b2), routing.counts
            ((out * dy).sum() + (logits * dl).sum()).backward()
            results.append([out.detach(), counts] + [t.grad for t in args if t is not None])
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("case", list(LAYER_CASES))
@pytest.mark.parametrize("frozen", ["none", "router", "x"])
def test_moe_router_in_the_node_equals_the_module_path(case, frozen, backend, device):
    """nn.MoE's eager path runs its router linear inside the layer's autograd node (one node,
    plans cached by shape); a hook on ``gate`` makes it call the module instead. Both give the
    same output, logits, counts and gradients (a loss on the logits too), with the router
    weight or the input not requiring a gradient, and a second call reuses the plan. Bit for bit."""
    route_kw, act, bias = LAYER_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()) + 1)
    layer = mnn.MoE(16, 8, 4, 2, activation=act, bias=bias, **route_kw).to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(device) * 0.3)
    layer.gate.weight.requires_grad_(frozen != "router")
    x0 = torch.randn(3, 4, 16, generator=gen).to(device)
    dy, dl = torch.randn(3, 4, 16, generator=gen).to(device), torch.randn(12, 4, generator=gen).to(device)
    results = []
    with mmkernels.use_backend(backend):
        for hooked in (False, False, True):
            handle = layer.gate.register_forward_hook(lambda m, i, o: None) if hooked else None
            x = x0.clone().requires_grad_(frozen != "x")
            r = layer(x)
            fn = type(r.router_logits.grad_fn).__name__
            assert fn == ("MmBackward0" if hooked else "MoELayerFunctionBackward"), fn
            ((r.output * dy).sum() + (r.router_logits * dl).sum()).backward()
            grads = [x.grad] + [p.grad for p in layer.parameters()]
            results.append([r.output.detach(), r.router_logits.detach(), r.counts] + grads)
            layer.zero_grad(set_to_none=True)
            if handle is not None:
                handle.remove()
    for fused, fused_again, module in zip(*results):
        if module is None:
            assert fused is None and fused_again is None
            continue
        assert torch.equal(fused, module) and torch.equal(fused_again, module)


@pytest.mark.parametrize("backend,device", [b for b in backends() if b.values[0] == "triton"])
@pytest.mark.parametrize("tokens,inter", [(12, 8), (2, 256)], ids=["grouped", "split-k"])
def test_moe_layer_reuses_a_workspace_only_when_nothing_can_read_it(tokens, inter, backend, device):
    """nn.MoE's Triton path hands its forward's workspace (routing integers, weights, the experts'
    rows) to the next call of the same shape once the autograd node that saved it is gone, and
    its backward's scratch once its launches are enqueued. Two forwards before one backward
    (backwards in the other order), a graph kept for a second backward while other calls run,
    and the counts a caller keeps across calls all give, bit for bit, what each call gives alone
    on fresh buffers; and a call after a freed graph does reuse its workspace. At decode sizes the
    down GEMM's split-K partials are part of the workspace."""
    from mmkernels.ops import _workspace

    gen = torch.Generator().manual_seed(7)
    layer = mnn.MoE(16, inter, 4, 2).to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(device) * 0.3)
    xs = [torch.randn(tokens, 16, generator=gen).to(device) * (i + 1) for i in range(2)]
    dys = [torch.randn(tokens, 16, generator=gen).to(device) for _ in xs]

    def alone(i):
        _workspace.clear()
        x = xs[i].clone().requires_grad_()
        r = layer(x)
        r.output.backward(dys[i])
        grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        return [r.output.detach(), r.counts.clone()] + grads

    def grads_of(x):
        out = [x.grad] + [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        return out

    with mmkernels.use_backend(backend):
        want = [alone(0), alone(1)]
        plan = next(iter(layer._plans._plans.values()))
        assert (plan.forward.splits > 1) == (tokens == 2)
        if tokens > 2:
            assert not torch.equal(want[0][1], want[1][1])  # the two inputs route differently
        _workspace.clear()
        # two graphs alive at once, their backwards in the other order
        x0, x1 = (x.clone().requires_grad_() for x in xs)
        r0, r1 = layer(x0), layer(x1)
        assert r0.output.grad_fn.lease.workspace is not r1.output.grad_fn.lease.workspace
        r1.output.backward(dys[1])
        got1 = [r1.output.detach(), r1.counts] + grads_of(x1)
        r0.output.backward(dys[0])
        got0 = [r0.output.detach(), r0.counts] + grads_of(x0)
        for got, exp in zip(got0 + got1, want[0] + want[1]):
            assert torch.equal(got, exp)
        # a graph kept for a second backward while other calls run and free theirs
        x0 = xs[0].clone().requires_grad_()
        r0 = layer(x0)
        r0.output.backward(dys[0], retain_graph=True)
        first = grads_of(x0)
        for _ in range(2):
            x1 = xs[1].clone().requires_grad_()
            r1 = layer(x1)
            r1.output.backward(dys[1])
            for got, exp in zip([r1.output.detach()] + grads_of(x1), want[1][:1] + want[1][2:]):
                assert torch.equal(got, exp)
            del r1
        x0.grad = None
        r0.output.backward(dys[0])
        for got, exp in zip(first + grads_of(x0), want[0][2:] * 2):
            assert torch.equal(got, exp)
        assert torch.equal(r0.counts, want[0][1])  # kept by the caller across the calls above
        # without a graph alive, the next call takes the workspace the last one left
        ws = r0.output.grad_fn.lease.workspace
        del r0
        with torch.no_grad():
            out = layer(xs[1])
        assert torch.equal(out.output, want[1][0]) and torch.equal(out.counts, want[1][1])
        r = layer(xs[0].clone().requires_grad_())
        assert r.output.grad_fn.lease.workspace is ws


def _moe_layers(n: int, device, inter: int = 8, dtype=torch.float32, seed: int = 11):
    """``n`` small nn.MoE layers of one shape (16 -> 16, 4 experts, top-2), weights drawn large
    enough that the routing varies."""
    gen = torch.Generator().manual_seed(seed)
    layers = [mnn.MoE(16, inter, 4, 2) for _ in range(n)]
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return [layer.to(device=device, dtype=dtype) for layer in layers]


@pytest.mark.parametrize("backend,device", [b for b in backends() if b.values[0] == "triton"])
def test_moe_layer_workspace_reuse_under_checkpointing_double_backward_and_dtypes(backend, device):
    """Where a reused workspace could still be read: activation checkpointing (its recomputed
    saved tensors outlive their node: no reuse under saved-tensor hooks), a double backward (its
    graph keeps the router's d logits: no reuse of the backward's scratch with create_graph), and
    layers of one shape in two dtypes (their workspaces have different sizes: different layouts).
    Each gives what the same calls give with nothing reused."""
    from torch.utils.checkpoint import checkpoint

    from mmkernels.ops import _workspace

    x0 = torch.randn(12, 16, generator=torch.Generator().manual_seed(5)).to(device)

    def run(reuse: bool, checkpointed: bool):
        _workspace.clear()
        previous, _workspace.MAX_BYTES = _workspace.MAX_BYTES, _workspace.MAX_BYTES if reuse else -1
        try:
            a, b = _moe_layers(2, device)
            x = x0.clone().requires_grad_()
            h = x
            for layer in (a, b):  # the backward: b's node, then a's (one layout)
                h = (checkpoint(lambda t, m=layer: m(t).output, h, use_reentrant=False) if checkpointed
                     else layer(h).output)
            # first order with a graph, another layer's backward in between, then the second order
            (gx,) = torch.autograd.grad(h.square().sum(), x, create_graph=True)
            y = b(x0 * 2).output
            y.sum().backward()
            gx.square().sum().backward()
            return [gx.detach(), y.detach()] + [p.grad for layer in (a, b) for p in layer.parameters()]
        finally:
            _workspace.MAX_BYTES = previous

    with mmkernels.use_backend(backend):
        for checkpointed in (False, True):
            for got, want in zip(run(True, checkpointed), run(False, checkpointed)):
                assert (got is None and want is None) or torch.equal(got, want)  # None: no second-order path
        # one shape in two dtypes: two layouts, each call as on fresh buffers
        _workspace.clear()
        layouts = set()
        for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
            (layer,) = _moe_layers(1, device, dtype=dtype)
            x = x0.to(dtype, copy=True).requires_grad_()
            layer(x).output.sum().backward()
            plan = next(iter(layer._plans._plans.values()))
            layouts.add((dtype, plan.workspace_layout) + tuple(bp.layout for bp in plan.backward_plans.values()))
            got = [x.grad] + [p.grad for p in layer.parameters()]
            _workspace.clear()
            layer.zero_grad(set_to_none=True)
            x = x0.to(dtype, copy=True).requires_grad_()
            layer(x).output.sum().backward()
            for g, want in zip(got, [x.grad] + [p.grad for p in layer.parameters()]):
                assert torch.equal(g, want)
        assert len(layouts) == 2 and len({ids[1:] for ids in layouts}) == 2


def test_workspace_pool_keeps_within_its_bounds():
    """Idle workspaces: none under a None key, at most KEEP per key and MAX_IDLE_BYTES in all,
    handed out once each, last in first out."""
    from mmkernels.ops import _workspace as W

    W.clear()
    W.release(None, "a", 1)
    assert W.acquire(None) is None
    for i in range(W.KEEP + 2):
        W.release("k", i, 1)
    assert [W.acquire("k") for _ in range(W.KEEP + 1)] == list(range(W.KEEP - 1, -1, -1)) + [None]
    W.release("big", "x", W.MAX_IDLE_BYTES)
    W.release("other", "y", 1)  # over the budget: left to the allocator
    assert W.acquire("other") is None and W.acquire("big") == "x"
    W.release("other", "y", 1)
    assert W.acquire("other") == "y"
    W.clear()


def test_layer_plans_follow_the_implementation_in_force():
    """A layer's cached plans are keyed by the implementation that runs (the backend and the CPU
    path selected), not only by shapes: switching either after a first call changes the plan."""
    from mmkernels import _cpp
    from mmkernels.ops.moe_layer import LayerPlans

    layer = mnn.MoE(16, 8, 4, 2)
    x = torch.randn(5, 16)
    args = (x, layer.gate.weight, layer.experts.gate_up_proj, layer.experts.down_proj, None, None, 2, 16, "silu",
            layer.route_kwargs, True, False)
    plans = LayerPlans()
    with mmkernels.use_backend("cpu"):
        first = plans.get(*args).backend
        with _cpp.use_cpu_impl("torch"):
            assert plans.get(*args).backend == "torch"
        assert plans.get(*args).backend == first == ("cpp" if _cpp.load() else "torch")
    if mmkernels._backend.interpreter_active():
        with mmkernels.use_backend("triton"):
            assert plans.get(*args).backend == "triton"

