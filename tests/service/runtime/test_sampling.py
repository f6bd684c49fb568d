import pytest
import torch

from service.runtime.sampling import SamplingParams, filter_logits, make_generator, sample, token_logprobs


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert sample(logits, [SamplingParams(), SamplingParams()], [None, None]).tolist() == [1, 0]


@pytest.mark.parametrize(
    "top_k, top_p, kept",
    [
        (0, 1.0, [0, 1, 2, 3]),
        (2, 1.0, [0, 1]),
        (1, 1.0, [0]),
        (0, 0.5, [0]),  # the top token alone holds 0.64 >= 0.5
        (0, 0.8, [0, 1]),  # 0.64 < 0.8, 0.64 + 0.24 >= 0.8
        (0, 1e-9, [0]),  # always keeps the most likely token
        (3, 0.8, [0, 1]),
    ],
)
def test_top_k_top_p_cuts(top_k, top_p, kept):
    probs = torch.tensor([0.64, 0.24, 0.08, 0.04])
    x = filter_logits(probs.log()[None], [SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)])[0]
    assert torch.isfinite(x).nonzero().flatten().tolist() == kept


def test_seeded_draws_repeat_and_depend_only_on_the_row():
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=7)

    def draw(x):
        gens = [make_generator(7) for _ in range(3)]
        return [sample(x, [p] * 3, gens).tolist() for _ in range(4)]  # four steps from the same generators

    assert draw(logits) == draw(logits)
    other_rows = torch.cat([logits[:1], torch.randn(2, 50)])
    assert [step[0] for step in draw(other_rows)] == [step[0] for step in draw(logits)]


def test_logprobs_use_the_model_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    lp = token_logprobs(logits, torch.tensor([0]))
    assert torch.allclose(lp, torch.log_softmax(logits, -1)[:, 0])
