import numpy as np
import pytest
import torch

from aiinfra.data.sampler import WindowSampler, eval_batches

TOKENS = np.arange(10_000, dtype=np.uint16)


def batches(sampler: WindowSampler, count: int) -> list[torch.Tensor]:
    return [sampler.next_batch()[0] for _ in range(count)]


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    a = batches(WindowSampler(TOKENS, 16, 8, seed=1), 5)
    b = batches(WindowSampler(TOKENS, 16, 8, seed=1), 5)
    c = batches(WindowSampler(TOKENS, 16, 8, seed=2), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_targets_are_inputs_shifted_by_one() -> None:
    inputs, targets = WindowSampler(TOKENS, 16, 4, seed=0).next_batch()
    assert inputs.shape == targets.shape == (4, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(targets - inputs, torch.ones_like(inputs))  # TOKENS is a ramp


@pytest.mark.parametrize("stop_after", [0, 3, 77, 80])
def test_resumes_exactly_from_saved_state_across_epochs(stop_after: int) -> None:
    # 624 windows / 8 per batch = 78 batches per epoch: stopping at 77 and 80 crosses the epoch boundary.
    reference = batches(WindowSampler(TOKENS, 16, 8, seed=3), 90)
    first = WindowSampler(TOKENS, 16, 8, seed=3)
    batches(first, stop_after)
    state = first.state_dict()
    resumed = WindowSampler(TOKENS, 16, 8, seed=3)
    resumed.load_state_dict(state)
    rest = batches(resumed, 90 - stop_after)
    assert all(torch.equal(x, y) for x, y in zip(reference[stop_after:], rest))


def test_an_epoch_visits_every_window_once() -> None:
    sampler = WindowSampler(TOKENS, 16, 8, seed=0)
    starts = torch.cat([b[:, 0] for b in batches(sampler, 78)])
    assert len(set(starts.tolist())) == 78 * 8
    assert sampler.epoch == 0


def test_data_parallel_ranks_split_the_global_batch() -> None:
    whole = WindowSampler(TOKENS, 16, 8, seed=5).next_batch()[0]
    parts = [WindowSampler(TOKENS, 16, 8, seed=5, dp_rank=r, dp_size=4).next_batch()[0] for r in range(4)]
    assert torch.equal(torch.cat(parts), whole)


def test_state_from_another_run_is_refused() -> None:
    sampler = WindowSampler(TOKENS, 16, 8, seed=0)
    with pytest.raises(ValueError, match="seed=1"):
        sampler.load_state_dict({**sampler.state_dict(), "seed": 1})


def test_eval_batches_are_fixed() -> None:
    first = [b[0] for b in eval_batches(TOKENS, 16, 4, 3)]
    second = [b[0] for b in eval_batches(TOKENS, 16, 4, 3)]
    assert len(first) == 3 and all(torch.equal(x, y) for x, y in zip(first, second))
