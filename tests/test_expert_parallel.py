"""Expert parallelism (mmkernels.ops.expert_parallel, nn.MoE(process_group=...)) on CPU with gloo:
P = 2 and 4 processes spawned here on loopback; outputs and every gradient (inputs, router,
experts) equal to the single-process MoE with the same weights, in every scenario of
mmkernels.testing.distributed (capacity on and off, a rank with no tokens, all tokens to one
rank, T = 1 on some ranks); a failing rank makes the others fail, not hang."""
import pytest
import torch

from mmkernels.nn import MoE
from mmkernels.ops import expert_parallel as ep
from mmkernels.testing import distributed as D


@pytest.mark.slow
@pytest.mark.parametrize("P", [2, 4])
def test_expert_parallel_equals_the_single_process_layer(P):
    reports = D.run(P, list(D.SCENARIOS))
    for r, rep in reports.items():
        assert rep["error"] is None, f"rank {r}: {rep['error']}\n{rep.get('traceback', '')}"
        assert not rep["problems"], f"rank {r}: {rep['problems']}"


@pytest.mark.slow
@pytest.mark.parametrize("hang", [False, True], ids=["exits", "hangs"])
def test_a_failing_rank_fails_the_others_within_the_timeout(hang):
    """The failing rank exits (its peers see the connection close) or stays alive without joining
    (its peers give up at the group's 5 s timeout): either way they raise a clear error, no hang."""
    reports = D.run(2, ["random"], fail_rank=1, timeout_s=5.0, deadline_s=120.0, hang=hang)
    assert "simulated failure" in (reports[1]["error"] or "")
    assert (reports[0]["error"] or "").startswith("ExpertParallelError: expert-parallel MoE: exchanging the "
                                                  "per-expert counts"), reports[0]
    assert reports[0]["seconds"] < 60, reports[0]


def test_shard_and_gather_state_dict_round_trip():
    m = MoE(8, 6, 4, 2, bias=True)
    sd = m.state_dict()
    shards = [ep.shard_state_dict(sd, r, 2) for r in range(2)]
    assert shards[1]["experts.gate_up_proj"].shape == (2, 12, 8)
    assert torch.equal(shards[1]["experts.down_proj"], sd["experts.down_proj"][2:])
    assert shards[0]["gate.weight"] is sd["gate.weight"]
    rebuilt = {k: torch.cat([s[k] for s in shards]) if k.startswith("experts.") else v for k, v in shards[0].items()}
    assert all(torch.equal(rebuilt[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match="do not split"):
        ep.shard_state_dict(sd, 0, 3)
