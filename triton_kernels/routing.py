"""MoE routing kernels: scores, top-k and weights; the counting sort of slots by expert; the
backward of the weights.

Index space. ``T`` tokens, ``E`` experts, ``K`` choices per token; a *slot* is ``s = t·K + j``.
A router program owns ``BLOCK_T`` consecutive tokens and holds their whole logit rows on chip as a
``[BLOCK_T, E_PAD]`` tile (``E_PAD`` = E rounded up to a power of two; padded columns are -inf),
so one read of the logits gives scores, selection and weights. Slot-shaped values are kept as
``[BLOCK_T, K_PAD]`` tiles and written once, coalesced.

Counting sort, deterministic, with no atomics:

1. ``route_topk_kernel``: block ``b`` writes ``hist[b, e]`` (its slots of expert ``e``) and each
   slot's ``rank`` among the block's earlier slots of its expert (an exclusive scan over the
   tokens of the block);
2. ``route_scan_kernel`` (one program per ``EB`` experts): ``base[b, e] = Σ_{b' < b} hist[b', e]``
   (the expert's slots in earlier blocks) and per-expert totals; the last program to finish turns
   the totals into counts (capacity), ``offsets``, drop rows and the tile counts;
3. ``route_scatter_kernel``: slot ``s`` of expert ``e`` is ``r = base[b, e] + rank``-th of its
   expert, so its row is ``offsets[e] + r`` (kept, ``r < CAP``) or
   ``drop_base[e] + r - CAP`` (dropped); it writes ``sorted_slots[row] = s`` and
   ``slot_rows[s] = row``, and fills the tile table.

``route_block_kernel`` does all three in one program when the tokens fit one block: its ranks
are the slots' ranks (``base`` is 0), and a barrier stands between the counts and their readers.

Selection: ``K`` rounds of arg-max over the row (ties to the lowest column; NaN keys rank below
-inf; a group's score counts NaN keys as -inf), so any ``K <= E`` works. Weight math runs in ``ACC`` (float32, float64 for float64 logits).
"""
import triton
import triton.language as tl

# scoring functions
SOFTMAX = 0
SIGMOID = 1


@triton.jit
def _column(tile, cols, j):
    """Column ``j`` of a 2-D tile, as a vector over its rows."""
    return tl.sum(tl.where(cols[None, :] == j, tile, 0), axis=1)


@triton.jit
def _slot_weights(lsel, valid, SCORING: tl.constexpr, RENORM: tl.constexpr, m_row, z_row, scaling,
                  EPS: tl.constexpr):
    """Weights of the chosen slots from their logits ``lsel`` ``[BLOCK_T, K_PAD]``; ``valid`` masks
    the real slots. ``m_row`` / ``z_row``: max and Σexp of the whole row (softmax without renorm)."""
    if SCORING == 0:
        if RENORM:  # softmax over the chosen logits == p_j / Σ p_i
            m = tl.max(tl.where(valid, lsel, float("-inf")), axis=1)
            e = tl.where(valid, tl.exp(lsel - m[:, None]), 0.0)
            w = e / tl.sum(e, axis=1)[:, None]
        else:
            w = tl.exp(lsel - m_row[:, None]) / z_row[:, None]
    else:
        s = 1.0 / (1.0 + tl.exp(-lsel))
        if RENORM:
            s = tl.where(valid, s, 0.0)
            w = s / (tl.sum(s, axis=1)[:, None] + EPS)
        else:
            w = s
    return w * scaling


@triton.jit
def _select_block(
    pid, logits_ptr, bias_ptr, ids_in_ptr,
    T, E, K, N_GROUPS, GROUP_SIZE, TOPK_GROUPS,
    s_lt, s_le, s_it, s_ij, s_b,
    scaling,
    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
    SCORING: tl.constexpr, RENORM: tl.constexpr, KEY_ON_SCORES: tl.constexpr, HAS_BIAS: tl.constexpr,
    G_PAD: tl.constexpr, GROUP_TILE: tl.constexpr, GIVEN_IDS: tl.constexpr, EPS: tl.constexpr, ACC: tl.constexpr,
):
    """The router's work for token block ``pid``: ``(weights, ids, rank, cnt)`` — the slots'
    weights (``ACC``), experts and ranks among the block's earlier slots of their expert, as
    ``[BLOCK_T, K_PAD]`` tiles, and the block's slots per token and expert ``[BLOCK_T, E_PAD]``
    (rows past ``T`` zero).

    ``KEY_ON_SCORES``: select on ``scores (+ bias)``, else on the logits (same order, no rounding).
    ``G_PAD > 1``: group-limited selection (group score = sum of its top-2 keys; keep
    ``TOPK_GROUPS`` of ``N_GROUPS`` groups of ``GROUP_SIZE`` experts; ``G_PAD`` = N_GROUPS
    rounded up to a power of two). ``GROUP_TILE`` = ``GROUP_SIZE`` where the groups tile the padded
    row (``G_PAD · GROUP_SIZE == E_PAD``: the real groups are then exactly the real columns, as
    DeepSeek-V3's 8 x 32): the row is viewed as ``[BLOCK_T, G_PAD, GROUP_TILE]`` and each group
    reduced along its own axis (three reductions over the row in all, where the loop over groups
    makes three per group; a padded group's score is never chosen); 0 otherwise. ``GIVEN_IDS``:
    read the choices from ``ids_in`` (clamped into ``[0, E)``) instead of selecting.
    """
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    kcols = tl.arange(0, K_PAD)
    tmask = offs_t < T
    cmask = cols < E
    l = tl.load(logits_ptr + offs_t[:, None] * s_lt + cols[None, :] * s_le,
                mask=tmask[:, None] & cmask[None, :], other=0.0).to(ACC)
    l = tl.where(cmask[None, :], l, float("-inf"))
    m_row = tl.max(l, axis=1)
    z_row = tl.sum(tl.where(cmask[None, :], tl.exp(l - m_row[:, None]), 0.0), axis=1)

    # per slot: the expert, its logit and the token's earlier slots of that expert; per token and
    # expert: its slots (0 or 1 when selecting, any count with given ids)
    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    lsel = tl.zeros([BLOCK_T, K_PAD], dtype=ACC)
    prior = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    cnt = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int32)
    if GIVEN_IDS:
        kmask = tmask[:, None] & (kcols[None, :] < K)
        ids = tl.load(ids_in_ptr + offs_t[:, None] * s_it + kcols[None, :] * s_ij, mask=kmask, other=0).to(tl.int32)
        ids = tl.minimum(tl.maximum(ids, 0), E - 1)
        for j in range(K):
            idx = _column(ids, kcols, j)
            hit = cols[None, :] == idx[:, None]
            lsel = tl.where(kcols[None, :] == j, tl.sum(tl.where(hit, l, 0.0), axis=1)[:, None], lsel)
            prior = tl.where(kcols[None, :] == j, tl.sum(tl.where(hit, cnt, 0), axis=1)[:, None], prior)
            cnt += hit.to(tl.int32)
    else:
        if KEY_ON_SCORES:
            if SCORING == 0:
                key = tl.exp(l - m_row[:, None]) / z_row[:, None]
            else:
                key = 1.0 / (1.0 + tl.exp(-l))
            if HAS_BIAS:
                key += tl.load(bias_ptr + cols * s_b, mask=cmask, other=0.0).to(ACC)[None, :]
        else:
            key = l
        nan = key != key
        key = tl.where(nan, float("-inf"), key)  # NaN ranks lowest (below -inf: see the loop)
        avail = (cols[None, :] < E) & (offs_t[:, None] >= 0)  # [BLOCK_T, E_PAD]
        if G_PAD > 1:
            # group score: the sum of the group's two best keys; keep the TOPK_GROUPS best groups
            gcols = tl.arange(0, G_PAD)
            group = cols // GROUP_SIZE
            if GROUP_TILE > 0:
                sub = tl.arange(0, GROUP_TILE)
                k3 = tl.reshape(key, [BLOCK_T, G_PAD, GROUP_TILE])
                top1 = tl.max(k3, axis=2)
                at1 = tl.min(tl.where(k3 == top1[:, :, None], sub[None, None, :], GROUP_TILE), axis=2)
                gscore = top1 + tl.max(tl.where(sub[None, None, :] == at1[:, :, None], float("-inf"), k3), axis=2)
            else:
                gscore = tl.full([BLOCK_T, G_PAD], float("-inf"), dtype=ACC)
                for g in range(N_GROUPS):
                    in_g = avail & (group[None, :] == g)
                    k1 = tl.where(in_g, key, float("-inf"))
                    top1 = tl.max(k1, axis=1)
                    at1 = tl.min(tl.where(in_g & (k1 == top1[:, None]), cols[None, :], E_PAD), axis=1)
                    top2 = tl.max(tl.where(cols[None, :] == at1[:, None], float("-inf"), k1), axis=1)
                    gscore = tl.where(gcols[None, :] == g, (top1 + top2)[:, None], gscore)
            gscore = tl.where(gscore != gscore, float("-inf"), gscore)
            gvalid = (gcols[None, :] < N_GROUPS) & (offs_t[:, None] >= 0)
            gkept = tl.zeros([BLOCK_T, G_PAD], dtype=tl.int32)
            for _ in range(TOPK_GROUPS):
                gk = tl.where(gkept > 0, float("-inf"), gscore)
                best = tl.max(tl.where(gvalid, gk, float("-inf")), axis=1)
                gi = tl.min(tl.where(gvalid & (gkept == 0) & (gk == best[:, None]), gcols[None, :], G_PAD), axis=1)
                gkept = tl.where(gcols[None, :] == gi[:, None], 1, gkept)
            if GROUP_TILE > 0:
                col_kept = tl.reshape(tl.broadcast_to(gkept[:, :, None], [BLOCK_T, G_PAD, GROUP_TILE]),
                                      [BLOCK_T, E_PAD])
            else:
                col_kept = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int32)
                for g in range(N_GROUPS):
                    col_kept += tl.where(group[None, :] == g, _column(gkept, gcols, g)[:, None], 0)
            avail = avail & (col_kept > 0)
        # each round takes its pick out of avail (the argument checks leave at least K columns to
        # pick from), so a token's picks are distinct and prior stays 0
        for j in range(K):
            ok = avail & ~nan  # numbers first (-inf included), the NaN keys after them
            kj = tl.where(ok, key, float("-inf"))
            best = tl.max(kj, axis=1)
            idx = tl.min(tl.where(ok & (kj == best[:, None]), cols[None, :], E_PAD), axis=1)
            idx = tl.where(idx < E_PAD, idx, tl.min(tl.where(avail, cols[None, :], E_PAD), axis=1))
            idx = tl.minimum(idx, E - 1)  # never out of bounds, whatever the keys
            hit = cols[None, :] == idx[:, None]
            avail = avail & ~hit
            ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
            lsel = tl.where(kcols[None, :] == j, tl.sum(tl.where(hit, l, 0.0), axis=1)[:, None], lsel)
            cnt += hit.to(tl.int32)

    cnt = tl.where(tmask[:, None], cnt, 0)
    before = tl.cumsum(cnt, axis=0) - cnt  # slots of each expert in earlier tokens of the block
    rank = prior
    for j in range(K):
        idx = _column(ids, kcols, j)
        r = tl.sum(tl.where(cols[None, :] == idx[:, None], before, 0), axis=1)
        rank += tl.where(kcols[None, :] == j, r[:, None], 0)

    valid = kcols[None, :] < K
    w = _slot_weights(lsel, valid, SCORING, RENORM, m_row, z_row, scaling, EPS)
    return w, ids, rank, cnt


@triton.jit
def route_topk_kernel(
    logits_ptr, bias_ptr, ids_in_ptr,
    weights_ptr, ids_ptr, rank_ptr, hist_ptr, done_ptr,
    T, E, K, N_GROUPS, GROUP_SIZE, TOPK_GROUPS,
    s_lt, s_le, s_it, s_ij, s_b,
    scaling,
    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
    SCORING: tl.constexpr, RENORM: tl.constexpr, KEY_ON_SCORES: tl.constexpr, HAS_BIAS: tl.constexpr,
    G_PAD: tl.constexpr, GROUP_TILE: tl.constexpr, GIVEN_IDS: tl.constexpr, EPS: tl.constexpr, ACC: tl.constexpr,
):
    """Scores, top-k, weights, block histogram and in-block ranks for ``BLOCK_T`` tokens
    (:func:`_select_block`).

    Writes ``weights`` (T, K), ``ids`` (T, K) int32, ``rank`` (T, K) int32 (the slot's rank among
    the earlier slots of the block with the same expert) and ``hist[pid, :E]`` int32; program 0
    zeroes the scan's completion counter ``done``.
    """
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(done_ptr, 0)
    w, ids, rank, cnt = _select_block(
        pid, logits_ptr, bias_ptr, ids_in_ptr, T, E, K, N_GROUPS, GROUP_SIZE, TOPK_GROUPS, s_lt, s_le, s_it, s_ij,
        s_b, scaling, BLOCK_T, E_PAD, K_PAD, SCORING, RENORM, KEY_ON_SCORES, HAS_BIAS, G_PAD, GROUP_TILE, GIVEN_IDS,
        EPS, ACC)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    kcols = tl.arange(0, K_PAD)
    cols = tl.arange(0, E_PAD)
    smask = (offs_t[:, None] < T) & (kcols[None, :] < K)
    out = offs_t[:, None] * K + kcols[None, :]
    tl.store(weights_ptr + out, w.to(weights_ptr.dtype.element_ty), mask=smask)
    tl.store(ids_ptr + out, ids, mask=smask)
    tl.store(rank_ptr + out, rank, mask=smask)
    tl.store(hist_ptr + pid * E + cols, tl.sum(cnt, axis=0), mask=cols < E)


@triton.jit
def route_scan_kernel(
    hist_ptr, base_ptr, total_ptr, done_ptr,
    counts_ptr, offsets_ptr, drop_base_ptr, tile_end_ptr, num_tiles_ptr,
    NB, E, CAP,
    E_PAD: tl.constexpr, EB: tl.constexpr, CHUNK_B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Program ``pid`` scans experts ``pid·EB ..`` down the block histograms:
    ``base[b, e] = Σ_{b'<b} hist[b', e]`` and ``total[e]``. The last program to finish (a counter
    that the router kernel zeroed, incremented with acquire-release semantics, so it sees every
    other program's totals) turns the totals into ``counts`` (kept, ``min(total, CAP)``),
    ``offsets`` (E + 1), ``drop_base`` (first row of each expert's dropped slots), ``tile_end``
    (inclusive prefix sum of the tiles per expert) and ``num_tiles``."""
    pid = tl.program_id(0)
    cols = pid * EB + tl.arange(0, EB)
    cmask = cols < E
    rows = tl.arange(0, CHUNK_B)
    carry = tl.zeros([EB], dtype=tl.int32)
    for b0 in range(0, NB, CHUNK_B):
        b = b0 + rows
        m = (b[:, None] < NB) & cmask[None, :]
        h = tl.load(hist_ptr + b[:, None] * E + cols[None, :], mask=m, other=0)
        tl.store(base_ptr + b[:, None] * E + cols[None, :], tl.cumsum(h, axis=0) - h + carry[None, :], mask=m)
        carry += tl.sum(h, axis=0)
    tl.store(total_ptr + cols, carry, mask=cmask)
    done = tl.atomic_add(done_ptr, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:
        ecols = tl.arange(0, E_PAD)
        total = tl.load(total_ptr + ecols, mask=ecols < E, other=0, cache_modifier=".cg")
        _finish_counts(total, counts_ptr, offsets_ptr, drop_base_ptr, tile_end_ptr, num_tiles_ptr, E, CAP, E_PAD,
                       BLOCK_M)


@triton.jit
def _finish_counts(total, counts_ptr, offsets_ptr, drop_base_ptr, tile_end_ptr, num_tiles_ptr, E, CAP,
                   E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """From the slots per expert ``total`` (``[E_PAD]``, 0 past ``E``): ``counts`` (kept,
    ``min(total, CAP)``), ``offsets`` (E + 1), ``drop_base`` (first row of each expert's dropped
    slots), ``tile_end`` (inclusive prefix sum of the tiles per expert) and ``num_tiles``."""
    ecols = tl.arange(0, E_PAD)
    emask = ecols < E
    kept = tl.minimum(total, CAP)
    off = tl.cumsum(kept, axis=0) - kept
    total_kept = tl.sum(kept, axis=0)
    drops = total - kept
    tl.store(counts_ptr + ecols, kept, mask=emask)
    tl.store(offsets_ptr + ecols, off, mask=emask)
    tl.store(offsets_ptr + E, total_kept)
    tl.store(drop_base_ptr + ecols, tl.cumsum(drops, axis=0) - drops + total_kept, mask=emask)
    tiles = (kept + BLOCK_M - 1) // BLOCK_M
    tl.store(tile_end_ptr + ecols, tl.cumsum(tiles, axis=0), mask=emask)
    tl.store(num_tiles_ptr, tl.sum(tiles, axis=0))


@triton.jit
def route_scatter_kernel(
    ids_ptr, rank_ptr, base_ptr, offsets_ptr, drop_base_ptr, tile_end_ptr, num_tiles_ptr,
    sorted_ptr, slot_rows_ptr, dropped_ptr, tile_expert_ptr, tile_start_ptr,
    T, E, K, CAP, MAX_TILES,
    BLOCK_T: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, TILE_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Program ``pid``: the slots of token block ``pid`` (stable rows, inverse, drop flags) and
    tiles ``pid·TILE_CHUNK ..`` of the tile table (expert, first row; -1 past ``num_tiles``)."""
    pid = tl.program_id(0)
    if pid * BLOCK_T < T:
        offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        kcols = tl.arange(0, K_PAD)
        smask = (offs_t[:, None] < T) & (kcols[None, :] < K)
        slot = offs_t[:, None] * K + kcols[None, :]
        e = tl.load(ids_ptr + slot, mask=smask, other=0)
        r = tl.load(base_ptr + pid * E + e, mask=smask, other=0) + tl.load(rank_ptr + slot, mask=smask, other=0)
        _place_slots(slot, e, r, smask, offsets_ptr, drop_base_ptr, sorted_ptr, slot_rows_ptr, dropped_ptr, CAP)
    if pid * TILE_CHUNK < MAX_TILES:
        _tile_table(pid, offsets_ptr, tile_end_ptr, num_tiles_ptr, tile_expert_ptr, tile_start_ptr, E, MAX_TILES,
                    E_PAD, TILE_CHUNK, BLOCK_M)


@triton.jit
def _place_slots(slot, e, r, smask, offsets_ptr, drop_base_ptr, sorted_ptr, slot_rows_ptr, dropped_ptr, CAP):
    """Slots ``slot`` of experts ``e``, each the ``r``-th of its expert: their rows (kept,
    ``r < CAP``: ``offsets[e] + r``; dropped: ``drop_base[e] + r - CAP``), written both ways, and
    their drop flags. The per-expert arrays are read from L2 (``.cg``): the one-block kernel wrote
    them itself a barrier earlier."""
    kept = r < CAP
    row = tl.where(kept, tl.load(offsets_ptr + e, mask=smask, other=0, cache_modifier=".cg") + r,
                   tl.load(drop_base_ptr + e, mask=smask, other=0, cache_modifier=".cg") + r - CAP)
    tl.store(sorted_ptr + row, slot, mask=smask)
    tl.store(slot_rows_ptr + slot, row, mask=smask)
    tl.store(dropped_ptr + slot, (~kept).to(tl.int1), mask=smask)


@triton.jit
def _tile_table(chunk, offsets_ptr, tile_end_ptr, num_tiles_ptr, tile_expert_ptr, tile_start_ptr, E, MAX_TILES,
                E_PAD: tl.constexpr, TILE_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Tiles ``chunk·TILE_CHUNK ..`` of the tile table (expert, first row; -1 past ``num_tiles``):
    tile ``i`` belongs to the expert ``e`` with ``tile_end[e-1] <= i < tile_end[e]`` (reads from
    L2, as :func:`_place_slots`)."""
    cols = tl.arange(0, E_PAD)
    idx = chunk * TILE_CHUNK + tl.arange(0, TILE_CHUNK)
    tend = tl.load(tile_end_ptr + cols, mask=cols < E, other=2**31 - 1, cache_modifier=".cg")
    te = tl.sum((tend[None, :] <= idx[:, None]).to(tl.int32), axis=1)
    te = tl.minimum(te, E - 1)  # idx past the last tile: any expert, masked below
    first = tl.load(offsets_ptr + te, cache_modifier=".cg")
    tiles_e = (tl.load(offsets_ptr + te + 1, cache_modifier=".cg") - first + BLOCK_M - 1) // BLOCK_M
    start_tile = tl.load(tile_end_ptr + te, cache_modifier=".cg") - tiles_e
    use = idx < tl.load(num_tiles_ptr, cache_modifier=".cg")
    tmask = idx < MAX_TILES
    tl.store(tile_expert_ptr + idx, tl.where(use, te, -1), mask=tmask)
    tl.store(tile_start_ptr + idx, tl.where(use, first + (idx - start_tile) * BLOCK_M, -1), mask=tmask)


@triton.jit
def route_block_kernel(
    logits_ptr, bias_ptr, ids_in_ptr,
    weights_ptr, ids_ptr, counts_ptr, offsets_ptr, sorted_ptr, slot_rows_ptr, dropped_ptr, tile_expert_ptr,
    tile_start_ptr, num_tiles_ptr, drop_base_ptr, tile_end_ptr,
    T, E, K, N_GROUPS, GROUP_SIZE, TOPK_GROUPS, CAP, MAX_TILES,
    s_lt, s_le, s_it, s_ij, s_b,
    scaling,
    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
    SCORING: tl.constexpr, RENORM: tl.constexpr, KEY_ON_SCORES: tl.constexpr, HAS_BIAS: tl.constexpr,
    G_PAD: tl.constexpr, GROUP_TILE: tl.constexpr, GIVEN_IDS: tl.constexpr, EPS: tl.constexpr, ACC: tl.constexpr,
    TILE_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The whole routing in one program when the tokens fit one block (``T <= BLOCK_T``: decode):
    the router (:func:`_select_block`), the counts from its histogram (the block's ranks are the
    slots' ranks: no scan), then, after a barrier, the slots' rows and the tile table — what the
    three kernels above write, in one launch where they take three."""
    w, ids, rank, cnt = _select_block(
        0, logits_ptr, bias_ptr, ids_in_ptr, T, E, K, N_GROUPS, GROUP_SIZE, TOPK_GROUPS, s_lt, s_le, s_it, s_ij,
        s_b, scaling, BLOCK_T, E_PAD, K_PAD, SCORING, RENORM, KEY_ON_SCORES, HAS_BIAS, G_PAD, GROUP_TILE, GIVEN_IDS,
        EPS, ACC)
    offs_t = tl.arange(0, BLOCK_T)
    kcols = tl.arange(0, K_PAD)
    smask = (offs_t[:, None] < T) & (kcols[None, :] < K)
    slot = offs_t[:, None] * K + kcols[None, :]
    tl.store(weights_ptr + slot, w.to(weights_ptr.dtype.element_ty), mask=smask)
    tl.store(ids_ptr + slot, ids, mask=smask)
    _finish_counts(tl.sum(cnt, axis=0), counts_ptr, offsets_ptr, drop_base_ptr, tile_end_ptr, num_tiles_ptr, E, CAP,
                   E_PAD, BLOCK_M)
    tl.debug_barrier()  # the counts, offsets, drop rows and tile ends are in memory for every thread
    _place_slots(slot, ids, rank, smask, offsets_ptr, drop_base_ptr, sorted_ptr, slot_rows_ptr, dropped_ptr, CAP)
    for chunk in range(0, tl.cdiv(MAX_TILES, TILE_CHUNK)):
        _tile_table(chunk, offsets_ptr, tile_end_ptr, num_tiles_ptr, tile_expert_ptr, tile_start_ptr, E, MAX_TILES,
                    E_PAD, TILE_CHUNK, BLOCK_M)


@triton.jit
def route_bwd_kernel(
    logits_ptr, ids_ptr, dw_ptr, dl_ptr, slot_rows_ptr, offsets_ptr,
    T, E, K, NB_P,
    s_lt, s_le, s_dt, s_dj,
    scaling,
    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
    SCORING: tl.constexpr, RENORM: tl.constexpr, EPS: tl.constexpr, ACC: tl.constexpr, PARTIALS: tl.constexpr,
):
    """``d logits`` (T, E) from ``d weights`` (T, K): recomputes the chosen scores from the logits.

    ``PARTIALS``: ``dw`` holds the experts' partial sums instead, ``NB_P`` per routed row in
    routing order (``dwp[row, p]``); slot ``s``'s gradient is their sum at ``row = slot_rows[s]``
    when kept (``row < offsets[E]``), else 0, added in order ``p = 0, 1, ..`` as
    ``experts_dw_kernel`` adds them (the same bits as that kernel and then this one).

    softmax, no renorm: ``dl = p ⊙ (g - Σ p g)`` with ``g`` the slot gradients scattered to their
    experts; softmax renorm: ``dl_j = q_j (g_j - Σ q g)`` at the chosen experts; sigmoid:
    ``ds_j`` (renorm: ``(g_j - Σ g w/scaling) / (Σ s + eps)``) times ``s_j (1 - s_j)``; all times
    ``scaling``. Slots choosing the same expert add up.
    """
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    kcols = tl.arange(0, K_PAD)
    tmask = offs_t < T
    cmask = cols < E
    valid = kcols[None, :] < K
    smask = tmask[:, None] & valid
    l = tl.load(logits_ptr + offs_t[:, None] * s_lt + cols[None, :] * s_le,
                mask=tmask[:, None] & cmask[None, :], other=0.0).to(ACC)
    l = tl.where(cmask[None, :], l, float("-inf"))
    ids = tl.load(ids_ptr + offs_t[:, None] * K + kcols[None, :], mask=smask, other=0)
    if PARTIALS:
        row = tl.load(slot_rows_ptr + offs_t[:, None] * K + kcols[None, :], mask=smask, other=0)
        kept = smask & (row < tl.load(offsets_ptr + E))
        g = tl.zeros([BLOCK_T, K_PAD], dtype=ACC)
        for p in range(NB_P):
            g += tl.load(dw_ptr + row * NB_P + p, mask=kept, other=0.0).to(ACC)
    else:
        g = tl.load(dw_ptr + offs_t[:, None] * s_dt + kcols[None, :] * s_dj, mask=smask, other=0.0).to(ACC)
    g = g * scaling
    lsel = tl.zeros([BLOCK_T, K_PAD], dtype=ACC)
    for j in range(K):
        idx = _column(ids, kcols, j)
        lsel = tl.where(kcols[None, :] == j,
                        tl.sum(tl.where(cols[None, :] == idx[:, None], l, 0.0), axis=1)[:, None], lsel)
    if SCORING == 0:
        if RENORM:
            m = tl.max(tl.where(valid, lsel, float("-inf")), axis=1)
            e = tl.where(valid, tl.exp(lsel - m[:, None]), 0.0)
            q = e / tl.sum(e, axis=1)[:, None]
            dsel = q * (g - tl.sum(q * g, axis=1)[:, None])
        else:
            dsel = g  # gradient w.r.t. the chosen probabilities; the dense softmax backward follows
    else:
        s = tl.where(valid, 1.0 / (1.0 + tl.exp(-lsel)), 0.0)
        if RENORM:
            denom = tl.sum(s, axis=1)[:, None] + EPS
            dsel = (g - tl.sum(g * s, axis=1)[:, None] / denom) / denom
        else:
            dsel = g
        dsel = dsel * s * (1.0 - s)
    dsel = tl.where(valid, dsel, 0.0)
    dense = tl.zeros([BLOCK_T, E_PAD], dtype=ACC)
    for j in range(K):
        idx = _column(ids, kcols, j)
        dense += tl.where(cols[None, :] == idx[:, None], _column(dsel, kcols, j)[:, None], 0.0)
    if SCORING == 0:
        if not RENORM:
            m_row = tl.max(l, axis=1)
            p = tl.where(cmask[None, :], tl.exp(l - m_row[:, None]), 0.0)
            p = p / tl.sum(p, axis=1)[:, None]
            dense = p * (dense - tl.sum(p * dense, axis=1)[:, None])
    tl.store(dl_ptr + offs_t[:, None] * E + cols[None, :], dense.to(dl_ptr.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


EXPECTATIONS = {
    "route_block_kernel": {"local_memory": 0},
    "route_topk_kernel": {"local_memory": 0},
    "route_scan_kernel": {"local_memory": 0},
    "route_scatter_kernel": {"local_memory": 0},
    "route_bwd_kernel": {"local_memory": 0},
}
