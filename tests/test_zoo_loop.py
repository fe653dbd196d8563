"""The zoo's shared training loop: stages, stops anywhere, bit-for-bit resume, identity."""

import pytest
import torch
from torch import nn

from seeclip.zoo.loop import Stage, batch_indices, cosine_warmup, run_stages


class _Fit(Stage):
    """Fits a linear map to a fixed target; its noise comes from the global RNG on purpose
    (the loop must carry that RNG across a stop), its batches from ``(seed, step)``."""

    def __init__(self, name: str, steps: int, model: nn.Linear, data: torch.Tensor):
        self.name, self.steps, self.model, self.data = name, steps, model, data
        self.began: list[str] = []

    def begin(self, live, kept):
        self.began.append("live" if live else "fresh")
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        if live is not None:
            self.model.load_state_dict(live["model"])
            self.opt.load_state_dict(live["opt"])
        elif "first" in kept:  # the second stage starts from what the first kept
            self.model.load_state_dict(kept["first"]["model"])

    def step(self, k):
        x = self.data[batch_indices(k, len(self.data), 4, seed=1)]
        x = x + 0.01 * torch.randn(x.shape)  # global RNG
        loss = (self.model(x) - x.sum(-1, keepdim=True)).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item(), {"loss": f"{loss.item():.3f}"}

    def state(self):
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def end(self):
        return {"model": {k: v.clone() for k, v in self.model.state_dict().items()}}


def _run(path, stop_at=None, identity=None, every=3):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    data = torch.arange(30.0).view(10, 3) / 30
    stages = [_Fit("first", 5, model, data), _Fit("second", 4, model, data)]
    state = run_stages(
        stages,
        path,
        identity or {"recipe": 1},
        stop_at=stop_at,
        checkpoint_every=every,
        progress=False,
    )
    return state, model, stages


def test_a_run_stopped_at_any_step_resumes_to_the_uninterrupted_weights(tmp_path):
    full, model, stages = _run(tmp_path / "full.pt")
    assert full.done and full.step == 9 and [len(v) for v in full.losses.values()] == [5, 4]
    assert [s.began for s in stages] == [["fresh"], ["fresh"]]
    assert torch.equal(full.kept["second"]["model"]["weight"], model.weight.detach())
    for stop in range(1, 9):
        path = tmp_path / f"stop{stop}.pt"
        part, _, _ = _run(path, stop_at=stop)
        assert not part.done and part.step == stop
        assert part.stage == ("first" if stop < 5 else "second")
        resumed, again, stages = _run(path)
        began = [s.began for s in stages]
        assert began == (
            [["live"], ["fresh"]] if stop < 5 else [[], ["fresh" if stop == 5 else "live"]]
        )
        assert resumed.losses == full.losses, stop
        assert torch.equal(again.weight, model.weight) and torch.equal(again.bias, model.bias)


def test_a_finished_run_returns_its_kept_state_without_training(tmp_path):
    full, _, _ = _run(tmp_path / "last.pt")
    again, _, stages = _run(tmp_path / "last.pt")
    assert again.done and [s.began for s in stages] == [[], []]
    assert torch.equal(
        again.kept["second"]["model"]["weight"], full.kept["second"]["model"]["weight"]
    )


def test_another_recipe_or_an_old_format_is_refused_in_one_line(tmp_path):
    path = tmp_path / "last.pt"
    _run(path, stop_at=2)
    with pytest.raises(ValueError, match="another config.*new --out"):
        _run(path, identity={"recipe": 2})
    torch.save({"identity": {"recipe": 1}, "step": 2}, path)
    with pytest.raises(ValueError, match="earlier seeclip"):
        _run(path)


def test_skipped_steps_count_towards_stop_at(tmp_path):
    model = nn.Linear(3, 1)
    data = torch.ones(10, 3)
    stage = _Fit("only", 4, model, data)
    state = run_stages([stage], tmp_path / "x.pt", {}, skipped=10, stop_at=12, progress=False)
    assert (state.stage, state.step, len(state.losses["only"])) == ("only", 12, 2)


def test_batches_cycle_seeded_epochs_and_the_schedule_warms_up_then_decays():
    idx = torch.cat([batch_indices(s, 10, 4, seed=0) for s in range(5)])
    assert sorted(idx[:10].tolist()) == list(range(10)) and sorted(idx[10:20].tolist()) == list(
        range(10)
    )
    assert torch.equal(batch_indices(3, 10, 4, seed=0), batch_indices(3, 10, 4, seed=0))
    factors = [cosine_warmup(s, 2, 10) for s in range(12)]
    assert factors[:2] == [0.5, 1.0] and factors[-1] == 0.0
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
