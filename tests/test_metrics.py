"""metrics.py against numbers worked out by hand (see the comments for each computation)."""

import math

import pytest
import torch

from sae_lightning.metrics import (
    LATENT_BLOCK_VALUES,
    PromptFireCounts,
    ReconstructionStats,
    batch_metrics,
    ce_loss_recovered,
    frequency_fractions,
    kl_div_score,
    next_token_kl,
    next_token_loss,
)

# x rows [1,2],[3,4],[5,0]; x_hat rows [1,1],[2,4],[5,2]
X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
X_HAT = torch.tensor([[1.0, 1.0], [2.0, 4.0], [5.0, 2.0]])
# latents: latent 0 fires on row 1, latent 1 on all rows, latent 2 never, latent 3 on row 2
Z = torch.tensor([[0.0, 1.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.5]])


def _full_stats(**kw: float) -> dict[str, float]:
    stats = ReconstructionStats(**kw)
    stats.update(X, X_HAT, Z)
    return stats.compute()


def test_reconstruction_numbers_by_hand() -> None:
    m = _full_stats()
    # squared errors per row: 0+1, 1+0, 0+4 -> SSE = 6; mse = 6 / (3 tokens * 2 dims)
    assert m["mse"] == pytest.approx(1.0)
    # mean x = [3, 2]; ||x - mean||^2 = 4, 4, 8 -> 16  (== N (E||x||^2 - ||Ex||^2) = 3 (55/3 - 13))
    assert m["nmse"] == pytest.approx(6 / 16)
    assert m["explained_variance"] == pytest.approx(1 - 6 / 16)
    # cos: 3/sqrt(5*2), 22/sqrt(25*20), 25/sqrt(25*29)
    cos = (3 / math.sqrt(10) + 22 / math.sqrt(500) + 25 / math.sqrt(725)) / 3
    assert m["cosine_sim"] == pytest.approx(cos)
    assert m["n_tokens"] == 3


def test_sparsity_numbers_by_hand() -> None:
    m = _full_stats()
    # non-zeros per row 1, 2, 2 -> l0 = 5/3; fire counts [1, 3, 0, 1]
    assert m["l0"] == pytest.approx(5 / 3)
    assert m["dead_fraction"] == pytest.approx(1 / 4)
    # densities [1/3, 1, 0, 1/3]: three above 0.1, one above 0.5
    assert m["dense_fraction"] == pytest.approx(3 / 4)
    assert _full_stats(dense_threshold=0.5)["dense_fraction"] == pytest.approx(1 / 4)


def test_feature_density_and_fire_counts_input() -> None:
    stats = ReconstructionStats()
    stats.update(X, X_HAT, torch.tensor([1, 3, 0, 1]))  # already reduced fire counts
    torch.testing.assert_close(stats.feature_density(), torch.tensor([1 / 3, 1.0, 0.0, 1 / 3]))
    m, full = stats.compute(), _full_stats()
    assert "l1" not in m  # counts carry no magnitudes
    del full["l1"]
    assert m == pytest.approx(full)


def test_l1_by_hand() -> None:
    # sum |z| per row: 1, 3, 1.5
    assert _full_stats()["l1"] == pytest.approx(5.5 / 3)


def test_shrinkage_numbers_by_hand() -> None:
    m = _full_stats()
    # ||x|| = sqrt5, 5, 5; ||x_hat|| = sqrt2, sqrt20, sqrt29
    assert m["l2_norm_in"] == pytest.approx((math.sqrt(5) + 10) / 3)
    assert m["l2_norm_out"] == pytest.approx((math.sqrt(2) + math.sqrt(20) + math.sqrt(29)) / 3)
    assert m["l2_ratio"] == pytest.approx((math.sqrt(2 / 5) + math.sqrt(20) / 5 + math.sqrt(29) / 5) / 3)
    # sum ||x_hat||^2 = 2 + 20 + 29 = 51; sum <x, x_hat> = 3 + 22 + 25 = 50
    assert m["relative_reconstruction_bias"] == pytest.approx(51 / 50)


def test_half_reconstruction_shrinks_by_half() -> None:
    stats = ReconstructionStats()
    stats.update(X, 0.5 * X)
    m = stats.compute()
    assert m["l2_ratio"] == pytest.approx(0.5)
    assert m["relative_reconstruction_bias"] == pytest.approx(0.5)  # 0.25 ||x||^2 / 0.5 ||x||^2
    assert m["l2_norm_out"] == pytest.approx(0.5 * m["l2_norm_in"])


def test_frequency_fractions_by_hand() -> None:
    m = _full_stats()
    # densities [1/3, 1, 0, 1/3] sum to 5/3: three latents above 1 % and 10 %, carrying all the firings
    assert m["freq_over_1_percent"] == pytest.approx(3 / 4)
    assert m["freq_over_10_percent"] == pytest.approx(3 / 4)
    assert m["normalized_freq_over_10_percent"] == pytest.approx(1.0)
    # above 50 %: only latent 1, with density 1 of the 5/3
    half = frequency_fractions(torch.tensor([1 / 3, 1.0, 0.0, 1 / 3]), 0.5)
    assert half == pytest.approx({"freq_over_50_percent": 1 / 4, "normalized_freq_over_50_percent": 3 / 5})
    assert frequency_fractions(torch.zeros(3), 0.01)["normalized_freq_over_1_percent"] == 0.0


def test_mean_output_explains_no_variance_and_identity_all() -> None:
    # an SAE that always outputs the set mean [3, 2]: SSE = the total variance -> explained variance 0,
    # whatever the batching
    mean_out, identity = ReconstructionStats(), ReconstructionStats()
    for x in X.split([2, 1]):
        mean_out.update(x, torch.tensor([[3.0, 2.0]]).expand_as(x))
        identity.update(x, x)
    assert mean_out.compute()["explained_variance"] == pytest.approx(0.0, abs=1e-12)
    assert identity.compute()["explained_variance"] == 1.0
    assert identity.compute()["l2_ratio"] == pytest.approx(1.0)
    assert identity.compute()["relative_reconstruction_bias"] == pytest.approx(1.0)


@pytest.mark.parametrize("split", [[1, 2], [2, 1], [1, 1, 1]])
def test_batching_does_not_change_the_result(split: list[int]) -> None:
    stats = ReconstructionStats()
    for x, x_hat, z in zip(X.split(split), X_HAT.split(split), Z.split(split), strict=True):
        stats.update(x, x_hat, z)
    assert stats.compute() == pytest.approx(_full_stats(), rel=1e-12)


def test_latents_wider_than_a_block_match_a_row_by_row_reference() -> None:
    """Latents are read in row blocks (``LATENT_BLOCK_VALUES``): a batch spanning several blocks gives the
    fire counts and L1 of a plain float64 computation, and cosine_sim is F.cosine_similarity's, 0 on a
    zero row."""
    g = torch.Generator().manual_seed(0)
    n, d_sae = 3 * (LATENT_BLOCK_VALUES // 4096) + 5, 4096
    z = torch.relu(torch.randn(n, d_sae, generator=g) - 1.0)
    x = torch.randn(n, 8, generator=g)
    x[0] = 0.0
    x_hat = x + 0.1 * torch.randn(n, 8, generator=g)
    stats = ReconstructionStats()
    stats.update(x, x_hat, z)
    torch.testing.assert_close(stats.fire_counts, (z != 0).sum(0).double())
    m = stats.compute()
    assert m["l1"] == pytest.approx(float(z.double().abs().sum()) / n, rel=1e-12)
    assert m["cosine_sim"] == pytest.approx(
        float(torch.nn.functional.cosine_similarity(x.double(), x_hat.double(), dim=-1).sum()) / n, rel=1e-12)


def test_merging_two_streams_equals_one() -> None:
    first, second = ReconstructionStats(), ReconstructionStats()
    first.update(X[:1], X_HAT[:1], Z[:1])
    second.update(X[1:], X_HAT[1:], Z[1:])
    first.merge(second)
    first.merge(ReconstructionStats())  # an empty one changes nothing
    assert first.compute() == pytest.approx(_full_stats(), rel=1e-12)


def test_total_variance_differs_from_per_batch_average() -> None:
    # batch 1: x = 0, 2 (x_hat 1, 1); batch 2: x = 10, 12 (x_hat 11, 11). Within each batch the
    # error equals the variance -> per-batch EV 0 and 0. Over the set: mean 6, total 36+16+16+36 = 104,
    # SSE 4 -> EV = 1 - 4/104.
    x1, h1 = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [1.0]])
    x2, h2 = torch.tensor([[10.0], [12.0]]), torch.tensor([[11.0], [11.0]])
    per_batch = [batch_metrics(x, h, 0)["explained_variance"] for x, h in ((x1, h1), (x2, h2))]
    naive = sum(per_batch) / 2
    stats = ReconstructionStats()
    stats.update(x1, h1)
    stats.update(x2, h2)
    assert naive == pytest.approx(0.0)
    assert stats.compute()["explained_variance"] == pytest.approx(1 - 4 / 104)


def test_batch_metrics_passes_l0_and_matches_one_batch_stats() -> None:
    m = batch_metrics(X, X_HAT, torch.tensor(2.5))
    assert m["l0"] == 2.5
    assert m["explained_variance"] == pytest.approx(1 - 6 / 16)
    assert m["mse"] == pytest.approx(1.0)


def test_stable_with_large_offset() -> None:
    # a 1e4 offset must not change the variance (naive E||x||^2 - ||Ex||^2 in float32 would)
    stats = ReconstructionStats()
    for x, x_hat in zip((X + 1e4).split(1), (X_HAT + 1e4).split(1), strict=True):
        stats.update(x, x_hat)
    assert stats.compute()["explained_variance"] == pytest.approx(1 - 6 / 16, rel=1e-9)


def test_ce_loss_recovered() -> None:
    assert ce_loss_recovered(2.0, 2.5, 3.0) == pytest.approx(0.5)
    assert ce_loss_recovered(2.0, 2.0, 3.0) == 1.0
    assert ce_loss_recovered(2.0, 3.0, 3.0) == 0.0
    assert math.isnan(ce_loss_recovered(2.0, 2.5, 2.0))


def test_kl_div_score() -> None:
    assert kl_div_score(0.0, 0.8) == 1.0  # splice changes nothing
    assert kl_div_score(0.8, 0.8) == 0.0  # as bad as zero-ablation
    assert kl_div_score(0.2, 0.8) == pytest.approx(0.75)
    assert math.isnan(kl_div_score(0.1, 0.0))


def test_next_token_loss_and_kl_by_hand() -> None:
    tokens = torch.tensor([[0, 0, 1]])
    uniform = torch.zeros(1, 3, 2)  # p = (1/2, 1/2)
    skewed = torch.tensor([[[math.log(3), 0.0]]]).expand(1, 3, 2)  # q = (3/4, 1/4)
    # position 0 predicts token 0, position 1 predicts token 1; the last position predicts nothing
    torch.testing.assert_close(next_token_loss(uniform, tokens), torch.full((1, 2), math.log(2)))
    expected = torch.tensor([[-math.log(3 / 4), -math.log(1 / 4)]])
    torch.testing.assert_close(next_token_loss(skewed, tokens), expected)
    # KL(p||q) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3)
    torch.testing.assert_close(next_token_kl(uniform, skewed), torch.full((1, 2), 0.5 * math.log(4 / 3)))
    torch.testing.assert_close(next_token_kl(skewed, skewed), torch.zeros(1, 2))


# six rows of prompts 0, 0, 1, 1, 1, 2; latent 0 fires on 4 rows in prompts 0 and 1, latent 1 on 2 rows in
# prompts 0 and 1, latent 2 never -> tokens per prompt fired in: 4/2, 2/2, undefined
DOCS = torch.tensor([0, 0, 1, 1, 1, 2])
Z6 = torch.tensor([[1.0, 0, 0], [2, 3, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize("split", [[6], [1, 5], [3, 3], [2, 1, 3], [1] * 6])
def test_consistent_activation_by_hand_for_any_batching(split: list[int]) -> None:
    prompts = PromptFireCounts()
    for z, doc in zip(Z6.split(split), DOCS.split(split), strict=True):
        prompts.update(z, doc)
    torch.testing.assert_close(prompts.counts, torch.tensor([2.0, 2.0, 0.0], dtype=torch.float64))
    heuristic = prompts.consistent_activation(torch.tensor([4.0, 2.0, 0.0]))
    torch.testing.assert_close(heuristic[:2], torch.tensor([2.0, 1.0]))
    assert math.isnan(heuristic[2])


@pytest.mark.parametrize("docs", [torch.full((6,), -1), torch.tensor([0, 1, 0, 1, 2, 2]),
                                  torch.tensor([0, 1, 2, 1, 2, 2])])  # unknown; unordered in/across batches
def test_consistent_activation_undefined_without_ordered_prompts(docs: torch.Tensor) -> None:
    prompts = PromptFireCounts()
    for z, doc in zip(Z6.split(3), docs.split(3), strict=True):
        prompts.update(z, doc)
    assert not prompts.valid and prompts.consistent_activation(torch.ones(3)) is None
