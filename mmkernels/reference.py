"""Naive float64 references. Independent of mmkernels: plain torch ops in float64, written the
obvious way. Every function takes tensors of any float dtype and returns float64 on the CPU."""
from __future__ import annotations

import torch


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def softmax_ref(x: torch.Tensor, dim: int) -> torch.Tensor:
    """exp(x - max) / sum exp(x - max) along dim."""
    x = _f64(x)
    if x.numel() == 0:
        return x.clone()
    m = x.amax(dim=dim, keepdim=True)
    e = (x - m).exp()
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax_ref(x: torch.Tensor, dim: int) -> torch.Tensor:
    x = _f64(x)
    if x.numel() == 0:
        return x.clone()
    m = x.amax(dim=dim, keepdim=True)
    z = x - m
    return z - z.exp().sum(dim=dim, keepdim=True).log()


def softmin_ref(x: torch.Tensor, dim: int) -> torch.Tensor:
    return softmax_ref(-_f64(x), dim)


def softmax_backward_ref(y: torch.Tensor, dy: torch.Tensor, dim: int, kind: str) -> torch.Tensor:
    """dx from the op's output y and the incoming gradient dy (the Jacobian-vector product)."""
    y, dy = _f64(y), _f64(dy)
    if kind == "softmax":
        return y * (dy - (y * dy).sum(dim=dim, keepdim=True))
    if kind == "log_softmax":
        return dy - y.exp() * dy.sum(dim=dim, keepdim=True)
    if kind == "softmin":
        return -y * (dy - (y * dy).sum(dim=dim, keepdim=True))
    raise ValueError(kind)


def softmax_backward_magnitude(y: torch.Tensor, dy: torch.Tensor, dim: int, kind: str) -> torch.Tensor:
    """Size of the terms each dx element is made from (|y|·(|dy| + |Σ y·dy|), or |dy| + e^y·|Σ dy|):
    the scale its rounding error is measured against, since dx itself can cancel to near zero."""
    y, dy = _f64(y), _f64(dy)
    if kind == "log_softmax":
        return dy.abs() + y.exp() * dy.sum(dim=dim, keepdim=True).abs()
    return y.abs() * (dy.abs() + (y * dy).sum(dim=dim, keepdim=True).abs())


FORWARD = {"softmax": softmax_ref, "log_softmax": log_softmax_ref, "softmin": softmin_ref}


def bilinear_ref(z: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """y[..., j] = Σ_h Σ_i z[..., h] x[..., i] w[j, h, i] + bias[j], as a float64 einsum."""
    y = torch.einsum("...h,...i,jhi->...j", _f64(z), _f64(x), _f64(w))
    return y + _f64(bias) if bias is not None else y


def bilinear_grads_ref(z, x, w, dy):
    """(dz, dx, dw, db) of bilinear_ref for the incoming gradient dy, as float64 einsums."""
    z, x, w, dy = _f64(z), _f64(x), _f64(w), _f64(dy)
    dz = torch.einsum("...j,...i,jhi->...h", dy, x, w)
    dx = torch.einsum("...j,...h,jhi->...i", dy, z, w)
    dw = torch.einsum("...j,...h,...i->jhi", dy, z, x)
    db = dy.reshape(-1, dy.shape[-1]).sum(0)
    return dz, dx, dw, db


def _f64_grad(t: torch.Tensor) -> torch.Tensor:
    """float64 on the CPU, keeping autograd history (for references differentiated by autograd)."""
    return t.to("cpu", torch.float64)


def quadratic_ref(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """y[..., j] = Σ_{i<=k} weight[j, p(i,k)] x[..., i] x[..., k] + bias[j], p in triu_indices order.
    Differentiable (autograd gives the reference gradients)."""
    x, weight = _f64_grad(x), _f64_grad(weight)
    c = x.shape[-1]
    feats = [x[..., i] * x[..., k] for i in range(c) for k in range(i, c)]
    y = torch.stack(feats, -1) @ weight.t()
    return y + _f64_grad(bias) if bias is not None else y


def hyperlinear_ref(x, cond, weight, hyper_weight, bias=None):
    """y[n] = W(z[n]) x[n] + b with the per-sample weight W(z) = W0 + Σ_h z_h U_h formed explicitly.
    Differentiable (autograd gives the reference gradients)."""
    x, cond, weight, hyper_weight = (_f64_grad(t) for t in (x, cond, weight, hyper_weight))
    per_sample = weight + torch.einsum("...h,ohi->...oi", cond, hyper_weight)
    y = torch.einsum("...oi,...i->...o", per_sample, x)
    return y + _f64_grad(bias) if bias is not None else y


def bilinear_magnitudes(z, x, w, dy):
    """(y, dz, dx, dw, db) of the absolute values: the size of the terms each result element sums,
    the scale its rounding error is measured against (a result can cancel to near zero)."""
    za, xa, wa, dya = (_f64(t).abs() for t in (z, x, w, dy))
    return (bilinear_ref(za, xa, wa),) + bilinear_grads_ref(za, xa, wa, dya)


# ----------------------------------------------------------------------------------------------
# MoE routing: a naive per-token loop for the selection and the dispatch metadata, float64 torch
# ops (differentiable) for the weights.
# ----------------------------------------------------------------------------------------------

import math  # noqa: E402


def _rank(value: float, index: int):
    """Sort key of one candidate, best first: NaN below everything (even -inf), ties to the lower index."""
    return (math.isnan(value), 0.0 if math.isnan(value) else -value, index)


def _best(values, candidates, n: int):
    """The ``n`` best of ``candidates`` (indices into ``values``), best first."""
    return sorted(candidates, key=lambda i: _rank(values[i], i))[:n]


def _softmax_rows(x: torch.Tensor) -> torch.Tensor:
    """exp(x - max) / Σ exp(x - max) over the last dim; differentiable, NaN rows stay NaN."""
    if x.shape[-1] == 0 or x.numel() == 0:
        return x.clone()
    m = x.detach().amax(dim=-1, keepdim=True)
    e = (x - m).exp()
    return e / e.sum(dim=-1, keepdim=True)


def routing_keys_ref(logits, scoring="softmax", selection_bias=None, n_groups=None) -> torch.Tensor:
    """The float64 selection key of every (token, expert): the logits themselves when there is no
    bias and no grouping (softmax and sigmoid are monotone), else scores + bias."""
    x = _f64(logits)
    if selection_bias is None and n_groups is None:
        return x
    scores = _softmax_rows(x) if scoring == "softmax" else torch.sigmoid(x)
    return scores + (_f64(selection_bias) if selection_bias is not None else 0.0)


def select_experts_ref(keys: torch.Tensor, top_k: int, n_groups=None, topk_groups=None) -> torch.Tensor:
    """(T, k) int64: per token, the ``top_k`` best keys, best first; with ``n_groups`` only among
    the experts of the ``topk_groups`` groups of best top-2 key sum (DeepSeek-V3)."""
    T, E = keys.shape
    out = []
    for row in keys.tolist():
        candidates = range(E)
        if n_groups is not None:
            size = E // n_groups
            members = [list(range(g * size, (g + 1) * size)) for g in range(n_groups)]
            group_scores = [sum(row[e] for e in _best(row, members[g], 2)) for g in range(n_groups)]
            kept = _best(group_scores, range(n_groups), topk_groups)
            candidates = [e for g in kept for e in members[g]]
        out.append(_best(row, candidates, top_k))
    return torch.tensor(out, dtype=torch.int64).reshape(T, top_k)


def routing_weights_ref(logits, expert_ids, *, scoring="softmax", renormalize=True, routed_scaling=1.0,
                        softmax_after_topk=False) -> torch.Tensor:
    """(T, k) float64 weights of the given choices; differentiable w.r.t. ``logits`` (autograd
    through this function gives the reference gradients)."""
    x = _f64_grad(logits)
    ids = expert_ids.to("cpu", torch.int64)
    chosen = x.gather(1, ids)
    if scoring == "softmax":
        if renormalize or softmax_after_topk:
            w = _softmax_rows(chosen)                       # exp(l_j) / Σ_i exp(l_i) over the k choices
        else:
            w = _softmax_rows(x).gather(1, ids)             # the full softmax probability
    else:
        s = torch.sigmoid(chosen)
        w = s / (s.sum(dim=-1, keepdim=True) + 1e-20) if renormalize else s
    return w * routed_scaling


def routing_grad_magnitude_ref(logits, expert_ids, dw, *, scoring="softmax", renormalize=True,
                               routed_scaling=1.0, softmax_after_topk=False) -> torch.Tensor:
    """(T, E) float64: the size of the terms each element of d(logits) is summed from, for the
    incoming gradient ``dw`` -- the scale its rounding error is measured against (the gradient
    itself cancels: a renormalised single choice has gradient 0)."""
    x, g = _f64(logits), _f64(dw).abs()
    ids = expert_ids.to("cpu", torch.int64)
    mag = torch.zeros_like(x)
    if ids.numel() == 0:
        return mag
    chosen = x.gather(1, ids)
    if scoring == "softmax" and not (renormalize or softmax_after_topk):
        p = _softmax_rows(x)
        gw = g * p.gather(1, ids)                                         # |g_j| p_{e_j}
        mag.scatter_add_(1, ids, gw)
        mag += p * gw.sum(dim=-1, keepdim=True)
    elif scoring == "softmax":
        q = _softmax_rows(chosen)
        mag.scatter_add_(1, ids, q * (g + (g * q).sum(dim=-1, keepdim=True)))
    else:
        s = torch.sigmoid(chosen)
        if renormalize:
            d = s.sum(dim=-1, keepdim=True) + 1e-20
            mag.scatter_add_(1, ids, s * (g / d + (g * s).sum(dim=-1, keepdim=True) / d**2))
        else:
            mag.scatter_add_(1, ids, s * g)
    return mag * abs(routed_scaling)


def dispatch_ref(expert_ids: torch.Tensor, num_experts: int, capacity, block_m: int) -> dict:
    """The dispatch metadata of (T, k) choices, slot by slot (slot s = t·k + j); int32 / bool tensors."""
    T, k = expert_ids.shape
    E, n = num_experts, T * k
    flat = expert_ids.reshape(-1).tolist()
    counts, dropped = [0] * E, []
    for e in flat:                                  # the first `capacity` slots of each expert stay
        drop = capacity is not None and counts[e] >= capacity
        counts[e] += 0 if drop else 1
        dropped.append(drop)
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    sorted_slots = sorted(range(n), key=lambda s: (dropped[s], flat[s], s))
    slot_rows = [0] * n
    for row, s in enumerate(sorted_slots):
        slot_rows[s] = row
    max_tiles = n // block_m + min(E, n)
    tiles = [(e, offsets[e] + i * block_m) for e in range(E) for i in range(-(-counts[e] // block_m))]
    pad = [(-1, -1)] * (max_tiles - len(tiles))

    def i32(v):
        return torch.tensor(v, dtype=torch.int32)

    return {
        "counts": i32(counts),
        "offsets": i32(offsets),
        "sorted_slots": i32(sorted_slots),
        "slot_rows": i32(slot_rows),
        "dropped": torch.tensor(dropped, dtype=torch.bool).reshape(T, k),
        "tile_experts": i32([e for e, _ in tiles + pad]),
        "tile_row_starts": i32([r for _, r in tiles + pad]),
        "num_tiles": i32([len(tiles)]),
        "capacity": capacity,
        "max_tiles": max_tiles,
    }


def route_ref(logits, top_k, *, scoring="softmax", renormalize=True, selection_bias=None, n_groups=None,
              topk_groups=None, routed_scaling=1.0, softmax_after_topk=False, capacity_factor=None,
              expert_ids=None, block_m=64) -> dict:
    """Everything ``moe.route`` returns, naively: ``weights`` (float64, differentiable w.r.t.
    ``logits``), ``expert_ids`` (int32) and the dispatch metadata of :func:`dispatch_ref`."""
    T, E = logits.shape
    if expert_ids is None:
        keys = routing_keys_ref(logits, scoring, selection_bias, n_groups)
        ids = select_experts_ref(keys, top_k, n_groups, topk_groups)
    else:
        ids = expert_ids.to("cpu", torch.int64)
        top_k = ids.shape[1]
    capacity = None if capacity_factor is None else math.ceil(capacity_factor * T * top_k / E)
    out = dispatch_ref(ids, E, capacity, block_m)
    out["weights"] = routing_weights_ref(logits, ids, scoring=scoring, renormalize=renormalize,
                                         routed_scaling=routed_scaling, softmax_after_topk=softmax_after_topk)
    out["expert_ids"] = ids.to(torch.int32)
    return out


def load_balancing_loss_ref(gate_logits, num_experts, top_k=2, attention_mask=None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (eqs. 4-6) over the layers of ``gate_logits`` (a tensor is
    one layer): E · Σ_e f_e · P_e, f_e = (masked) top-k choices of e per token, P_e = (masked) mean
    probability of e. Differentiable w.r.t. the logits through P."""
    if isinstance(gate_logits, torch.Tensor):
        gate_logits = (gate_logits,)
    x = torch.cat([_f64_grad(g) for g in gate_logits])
    p = _softmax_rows(x)
    if attention_mask is None:
        mask = torch.ones(x.shape[0], dtype=torch.float64)
    else:
        mask = _f64(attention_mask).reshape(-1).repeat(len(gate_logits))
    f = torch.zeros(num_experts, dtype=torch.float64)
    for t, row in enumerate(p.detach().tolist()):
        for e in _best(row, range(num_experts), top_k):
            f[e] += mask[t]
    total = mask.sum()
    big_p = (p * mask[:, None]).sum(0) / total
    return num_experts * ((f / total) * big_p).sum()


def router_z_loss_ref(logits) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2, in float64; differentiable."""
    x = _f64_grad(logits)
    m = x.detach().amax(dim=-1, keepdim=True)
    lse = ((x - m).exp().sum(-1).log() + m.squeeze(-1))
    return (lse**2).mean()


# ----------------------------------------------------------------------------------------------
# MoE experts: a per-token loop of float64 matrix-vector products (differentiable by autograd, so
# it also gives the reference gradients for every input).
# ----------------------------------------------------------------------------------------------

def _gated_ref(gate: torch.Tensor, up: torch.Tensor, activation: str, alpha: float, limit: float) -> torch.Tensor:
    """act(gate) · up from the formulas (gpt-oss: (clamp(up, ±limit) + 1) · g·σ(α g), g = min(gate, limit))."""
    if activation == "silu":
        return gate * torch.sigmoid(gate) * up
    if activation == "gelu":
        return 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2.0))) * up
    if activation == "gelu_tanh":
        inner = math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3)
        return 0.5 * gate * (1 + torch.tanh(inner)) * up
    if activation == "relu":
        return torch.where(gate > 0, gate, torch.zeros_like(gate)) * up
    if activation == "swiglu_oai":
        g = torch.where(gate > limit, torch.full_like(gate, limit), gate)
        u = torch.where(up > limit, torch.full_like(up, limit), up)
        u = torch.where(u < -limit, torch.full_like(u, -limit), u)
        return (u + 1) * (g * torch.sigmoid(alpha * g))
    raise ValueError(activation)


def experts_ref(x, weights, expert_ids, dropped, gate_up, down, b1=None, b2=None, activation="silu",
                interleaved=False, alpha=1.702, limit=7.0) -> torch.Tensor:
    """(T, H) float64: out[t] = Σ_j w[t, j] · (down_e @ act(gate_e x_t + b1_gate) · (up_e x_t + b1_up) + b2_e),
    e = expert_ids[t, j], over the choices not ``dropped``. ``gate_up`` (E, 2I, H): gate rows 0..I
    then up rows (``interleaved``: gate rows even, up rows odd); ``down`` (E, H, I). One token and
    one choice at a time; differentiable w.r.t. x, weights, gate_up, down, b1, b2."""
    x, weights, gate_up, down = (_f64_grad(t) for t in (x, weights, gate_up, down))
    b1 = _f64_grad(b1) if b1 is not None else None
    b2 = _f64_grad(b2) if b2 is not None else None
    ids = expert_ids.to("cpu", torch.int64).tolist()
    drop = dropped.to("cpu", torch.bool).tolist() if dropped is not None else None
    T, H = x.shape
    I = gate_up.shape[1] // 2
    rows = []
    for t in range(T):
        acc = torch.zeros(H, dtype=torch.float64)
        for j, e in enumerate(ids[t]):
            if drop is not None and drop[t][j]:
                continue
            h = gate_up[e] @ x[t]
            if b1 is not None:
                h = h + b1[e]
            if interleaved:
                gate, up = h[0::2], h[1::2]
            else:
                gate, up = h[:I], h[I:]
            y = down[e] @ _gated_ref(gate, up, activation, alpha, limit)
            if b2 is not None:
                y = y + b2[e]
            acc = acc + weights[t, j] * y
        rows.append(acc)
    if not rows:
        return torch.zeros(0, H, dtype=torch.float64) + 0 * x.sum()
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------
# Cross-entropy, the attention module and switches, gated fusion, dense MoE, product units,
# sigma-pi units and the pi-sigma network
# ----------------------------------------------------------------------------------------------

def cross_entropy_ref(logits, target, *, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """``F.cross_entropy`` from its definition: the target distribution ``q = (1-ε)·onehot(t) + ε/C``,
    ``loss_n = -Σ_c q_c · log p_c`` with ``log p = x - log Σ exp x``; rows with ``t == ignore_index``
    are 0 and left out of the mean. Differentiable w.r.t. ``logits``."""
    x = _f64_grad(logits)
    t = target.to("cpu", torch.int64).reshape(-1)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    N, C = x.shape
    m = x.detach().amax(dim=1, keepdim=True)
    logp = x - m - (x - m).exp().sum(dim=1, keepdim=True).log()
    valid = t != ignore_index
    q = torch.full((N, C), label_smoothing / C, dtype=torch.float64)
    rows = valid.nonzero().flatten()
    q[rows, t[rows]] += 1.0 - label_smoothing
    loss = -torch.where(q != 0, q * logp, 0.0).sum(dim=1)  # a zero weight on a -inf log p adds nothing
    loss = torch.where(valid, loss, 0.0)
    if reduction == "mean":
        return loss.sum() / valid.sum()
    if reduction == "sum":
        return loss.sum()
    return loss.reshape(target.shape)


def linear_cross_entropy_ref(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                             ignore_index=-100, label_smoothing=0.0, z_loss_scale=0.0, softcap=0.0):
    """The loss of an output layer from its definition, and each row's target log-probability:
    logits ``u = x·Wᵀ + b``, capped ``z = cap·tanh(u / cap)`` (``softcap`` > 0), ``log p = z - lse``
    with ``lse = log Σ_c exp z_c``; ``loss_n = -Σ_c w_c·q_c·log p_c + zs·lse²`` with
    ``q = (1-ε)·onehot(t) + ε/C`` and class weights ``w`` (all 1 without ``weight``); ignored rows
    are 0; the mean divides by ``Σ_n w_{t_n}`` over the rows not ignored. Returns
    ``(loss, target log-probability (N,) — 0 in ignored rows)``; differentiable w.r.t. ``input``,
    ``linear_weight`` and ``linear_bias``."""
    x, W = _f64_grad(input), _f64_grad(linear_weight)
    u = x.reshape(-1, x.shape[-1]) @ W.T
    if linear_bias is not None:
        u = u + _f64_grad(linear_bias)
    z = softcap * torch.tanh(u / softcap) if softcap else u
    t = target.to("cpu", torch.int64).reshape(-1)
    N, C = z.shape
    w = torch.ones(C, dtype=torch.float64) if weight is None else _f64(weight)
    m = z.detach().amax(dim=1, keepdim=True)
    lse = m.squeeze(1) + (z - m).exp().sum(dim=1).log()
    logp = z - lse[:, None]
    valid = t != ignore_index
    safe = torch.where(valid, t, 0)
    q = torch.full((N, C), label_smoothing / C, dtype=torch.float64)
    q[torch.arange(N), safe] += 1.0 - label_smoothing
    loss = -torch.where(q != 0, w * q * logp, 0.0).sum(dim=1) + z_loss_scale * lse * lse
    loss = torch.where(valid, loss, 0.0)
    target_logp = torch.where(valid, logp.gather(1, safe[:, None]).squeeze(1), 0.0)
    if reduction == "mean":
        loss = loss.sum() / torch.where(valid, w[safe], 0.0).sum()
    elif reduction == "sum":
        loss = loss.sum()
    else:
        loss = loss.reshape(target.shape)
    return loss, target_logp.reshape(target.shape)


def linear_cross_entropy_magnitudes(input, linear_weight, target, grad, *, linear_bias=None, weight=None,
                                    reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss_scale=0.0,
                                    softcap=0.0):
    """The size of the terms behind each result of :func:`linear_cross_entropy_ref` (its loss and
    its gradients cancel): the loss from ``a·|lse| + (1-ε)·w_t·|z_t| + ε/C·Σ_c w_c·|z_c| + zs·lse²``;
    d logits from ``|g|·(|a|·p + (1-ε)·w_t·onehot + ε/C·w)``; d x, d W, d b from those times
    ``|W|``, ``|x|``, 1. Returns ``(loss, d input, d linear_weight, d linear_bias)``."""
    x, W = _f64(input).reshape(-1, input.shape[-1]), _f64(linear_weight)
    u = x @ W.T + (0.0 if linear_bias is None else _f64(linear_bias))
    z = softcap * torch.tanh(u / softcap) if softcap else u
    t = target.to("cpu", torch.int64).reshape(-1)
    N, C = z.shape
    eps = label_smoothing
    w = torch.ones(C, dtype=torch.float64) if weight is None else _f64(weight)
    valid = t != ignore_index
    safe = torch.where(valid, t, 0)
    w_t = w[safe]
    lse = torch.logsumexp(z, dim=1)
    a = ((1 - eps) * w_t + eps / C * w.sum() + 2 * z_loss_scale * lse).abs()
    rows = a * lse.abs() + (1 - eps) * w_t * z.gather(1, safe[:, None]).abs().squeeze(1) \
        + eps / C * (z.abs() @ w) + z_loss_scale * lse * lse
    rows = torch.where(valid, rows, 0.0)
    g = _f64(grad).reshape(-1)
    divisor = torch.where(valid, w_t, 0.0).sum()
    if reduction == "none":
        loss_mag, g_rows = rows.reshape(target.shape), g.expand(N)
    elif reduction == "sum":
        loss_mag, g_rows = rows.sum(), g.expand(N)
    else:
        loss_mag, g_rows = rows.sum() / divisor, (g / divisor).expand(N)
    onehot = torch.zeros(N, C, dtype=torch.float64).scatter_(1, safe[:, None], ((1 - eps) * w_t)[:, None])
    dz = a[:, None] * torch.softmax(z, dim=1) + onehot + eps / C * w
    du = torch.where(valid[:, None], g_rows.abs()[:, None] * dz, 0.0)
    return loss_mag, (du @ W.abs()).reshape(input.shape), du.T @ x.abs(), du.sum(0)


def attention_module_ref(z, x, mask=None, temperature=1.0):
    """``s[..., d] = Σ_j p_j · x[..., j, d]`` with ``p = softmax(z / τ)`` over the allowed ``j``
    (``mask`` True); a row with nothing allowed gives ``s = 0``. Differentiable."""
    z, x = _f64_grad(z), _f64_grad(x)
    logits = z / temperature
    if mask is not None:
        allowed = mask.to("cpu").expand(z.shape)
        logits = torch.where(allowed, logits, float("-inf"))
        any_allowed = allowed.any(dim=-1, keepdim=True)
        logits = torch.where(any_allowed, logits, 0.0)  # an empty row: finite logits, weights zeroed below
    e = (logits - logits.detach().amax(dim=-1, keepdim=True)).exp()
    p = e / e.sum(dim=-1, keepdim=True)
    if mask is not None:
        p = torch.where(allowed & any_allowed, p, 0.0)
    return (p.unsqueeze(-1) * x).sum(dim=-2)


def gated_fusion_ref(a, b, weight, bias=None):
    """Gated fusion: ``g = σ([a, b] · Wᵀ + c)``, ``out = g·a + (1 - g)·b``. Differentiable."""
    a, b, weight = _f64_grad(a), _f64_grad(b), _f64_grad(weight)
    pre = torch.cat([a, b], dim=-1) @ weight.T
    if bias is not None:
        pre = pre + _f64_grad(bias)
    g = 1.0 / (1.0 + torch.exp(-pre))
    return g * a + (1.0 - g) * b


def cross_entropy_magnitudes(logits, target, grad, *, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """The size of the terms each result of :func:`cross_entropy_ref` sums (for the assert's
    ``magnitude``: a loss of ``lse - x_t`` or a gradient of ``p_t - 1`` can cancel to ~0): the loss
    from ``|lse| + (1-ε)|x_t| + ε/C·Σ|x|``, d logits from ``|g|·(p + (1-ε)·onehot + ε/C)``."""
    x = _f64(logits)
    t = target.to("cpu", torch.int64).reshape(-1)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    N, C = x.shape
    eps = label_smoothing
    valid = t != ignore_index
    safe = torch.where(valid, t, 0)
    lse = torch.logsumexp(x, dim=1)
    fin = torch.where(torch.isfinite(x), x.abs(), 0.0)
    rows = lse.abs() + (1 - eps) * fin.gather(1, safe[:, None]).squeeze(1) + eps / C * fin.sum(1)
    rows = torch.where(valid, rows, 0.0)
    g = _f64(grad).reshape(-1)
    if reduction == "none":
        loss_mag, g_rows = rows.reshape(target.shape), g.expand(N)
    elif reduction == "sum":
        loss_mag, g_rows = rows.sum(), g.expand(N)
    else:
        loss_mag, g_rows = rows.sum() / valid.sum(), (g / valid.sum()).expand(N)
    onehot = torch.zeros(N, C, dtype=torch.float64).scatter_(1, safe[:, None], 1.0 - eps)
    p = torch.softmax(x, dim=1)
    grad_mag = torch.where(valid[:, None], g_rows.abs()[:, None] * (p + onehot + eps / C), 0.0)
    return loss_mag, grad_mag.reshape(logits.shape)


def attention_module_magnitudes(z, x, ds, mask=None, temperature=1.0):
    """The size of the terms behind each result of :func:`attention_module_ref` (they cancel for
    inputs of mixed sign): ``s`` from ``Σ_j p_j |x_j|``, ``dz`` from ``p_j (|x_j|·|ds| + Σ_i p_i
    |x_i|·|ds|) / τ``; ``dx = p ⊗ ds`` does not cancel."""
    with torch.no_grad():
        p = attention_module_ref(z, torch.eye(z.shape[-1], dtype=torch.float64).expand(*z.shape, z.shape[-1]),
                                 mask, temperature)  # s with x = identity rows: the weights p
        ax, ads = _f64(x).abs(), _f64(ds).abs()
        s_mag = (p.unsqueeze(-1) * ax).sum(-2)
        a = (ax * ads.unsqueeze(-2)).sum(-1)
        dz_mag = p * (a + (s_mag * ads).sum(-1, keepdim=True)) / temperature
    return s_mag, dz_mag


def hard_switch_ref(z, x):
    """``x[..., argmax z, :]`` row by row (ties to the lowest index), float64."""
    z, x = _f64(z), _f64(x)
    J, D = z.shape[-1], x.shape[-1]
    zr, xr = z.reshape(-1, J), x.reshape(-1, J, D)
    out = torch.stack([xr[r, max(range(J), key=lambda j: (zr[r, j].item(), -j))] for r in range(zr.shape[0])]) \
        if zr.shape[0] else torch.zeros(0, D, dtype=torch.float64)
    return out.reshape(*z.shape[:-1], D)


def gated_fusion_magnitudes(a, b, weight, dout):
    """Sizes of the terms behind :func:`gated_fusion_ref`'s results (``a - b`` and the GEMM sums
    cancel for mixed signs): out from ``|a| + |b|``; da, db from ``|dout| + |dpre|·|W|``; dW from
    ``|dpre|ᵀ·[|a|, |b|]`` with ``|dpre| = |dout|·(|a| + |b|)/4`` (σ' <= 1/4)."""
    a, b, w, dout = _f64(a), _f64(b), _f64(weight), _f64(dout)
    D = a.shape[-1]
    dpre = dout.abs() * (a.abs() + b.abs()) / 4
    ab = torch.cat([a.abs(), b.abs()], dim=-1)
    dab = dout.abs().repeat_interleave(1, -1)
    return {"out": a.abs() + b.abs(),
            "a": dab + dpre @ w[:, :D].abs(), "b": dab + dpre @ w[:, D:].abs(),
            "weight": dpre.reshape(-1, D).T @ ab.reshape(-1, 2 * D), "bias": dpre.reshape(-1, D).sum(0)}


def dense_moe_ref(x, gate_weight, gate_up, down, activation="silu"):
    """``y_t = Σ_e softmax(W_g x_t)_e · down_e(act(gate_e x_t) · up_e x_t)``, expert by expert in
    float64. Differentiable."""
    x, gw, gate_up, down = (_f64_grad(t) for t in (x, gate_weight, gate_up, down))
    p = _softmax_rows(x @ gw.T)
    I = gate_up.shape[1] // 2
    out = torch.zeros_like(x)
    for e in range(gw.shape[0]):
        h = x @ gate_up[e].T
        out = out + p[:, e:e + 1] * (_gated_ref(h[:, :I], h[:, I:], activation, 1.702, 7.0) @ down[e].T)
    return out


PRODUCT_EPS_REF = 2.0 ** -100  # the documented clamp of |x| in mmkernels.product_unit


def product_unit_ref(x, weight, out_weight=None):
    """``p_j = Re Π_i x_i^{w_ji}`` by complex powers (principal branch: a negative x is
    ``|x|·e^{iπ}``), ``|x| < 2^-100`` replaced by ``+2^-100`` (zero gradient there); then
    ``o = p·vᵀ``. Differentiable."""
    x, w = _f64_grad(x), _f64_grad(weight)
    xc = torch.where(x.abs() < PRODUCT_EPS_REF, torch.full_like(x, PRODUCT_EPS_REF), x)
    powers = torch.pow(xc.to(torch.complex128).unsqueeze(-2), w.to(torch.complex128))  # (..., J, I)
    p = torch.real(powers.prod(dim=-1))
    return p if out_weight is None else p @ _f64_grad(out_weight).T


def product_unit_magnitudes(x, weight, dp):
    """Sizes behind the product unit's d x and d W (sums of ``±dA·log|x|`` cancel): from
    ``|dA| = |dp|·|p|``-like terms: ``|dp|·e^A`` times ``|W|`` (dx, over |x|) and ``|log|x|| + π``
    (dW)."""
    x, w, dp = _f64(x), _f64(weight), _f64(dp)
    lg = torch.log(x.abs().clamp_min(PRODUCT_EPS_REF))
    ea = torch.exp(lg @ w.T)
    t = dp.abs() * ea * (1 + math.pi)
    dx = (t @ w.abs()) / x.abs().clamp_min(PRODUCT_EPS_REF)
    dw = t.reshape(-1, t.shape[-1]).T @ (lg.abs() + 1).reshape(-1, x.shape[-1])
    return dx, dw


def sigma_pi_unit_ref(z, conjuncts, weight, bias=None):
    """``o_k = Σ_q w_kq Π_{i∈q, i>=0} z_i + b_k``, conjunct by conjunct. Differentiable."""
    z, w = _f64_grad(z), _f64_grad(weight)
    feats = []
    for q in conjuncts.tolist():
        f = torch.ones(z.shape[:-1], dtype=torch.float64)
        for i in q:
            if i >= 0:
                f = f * z[..., i]
        feats.append(f)
    out = torch.stack(feats, dim=-1) @ w.T
    return out if bias is None else out + _f64_grad(bias)


def pi_sigma_ref(z, weight, bias=None):
    """``o_k = Π_s (w_ks·z + b_ks)`` (no activation), unit by unit. Differentiable."""
    z, w = _f64_grad(z), _f64_grad(weight)
    K, S, _ = w.shape
    outs = []
    for k in range(K):
        acc = torch.ones(z.shape[:-1], dtype=torch.float64)
        for s in range(S):
            h = (z * w[k, s]).sum(-1)
            if bias is not None:
                h = h + _f64_grad(bias)[k, s]
            acc = acc * h
        outs.append(acc)
    return torch.stack(outs, dim=-1)
