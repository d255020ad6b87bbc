"""evaluate/absorption.py: absorption measured on a synthetic case where it is planted (full absorption on
some tokens of one letter, partial on another, none on a third), and the pieces it is built from."""

import math

import pytest
import torch

from sae_lightning.evaluate.absorption import (
    AbsorptionSettings,
    LetterRows,
    absorption_metrics,
    absorption_per_row,
    first_letter,
    fit_logistic,
    measure_absorption,
    split_by_token,
)
from sae_lightning.lm import HookPoint
from sae_lightning.saes import build_sae
from sae_lightning.saes.relu import ReLUConfig

LETTERS = {0: "a", 1: "b", 2: "c"}
TRAIN, TEST, OCCURRENCES = 20, 10, 3  # tokens per letter in each split, rows per token
# tokens (index within the letter's train or test tokens) whose letter a token latent absorbs
FULL = {"a": {"train": [0, 1], "test": [0, 1, 2]}}  # a: the main latent is silent there
PARTIAL = {"c": {"train": [0, 1, 2], "test": [0, 1, 2, 3, 4]}}  # c: main and token latent share it


def _planted(full: dict = FULL, partial: dict = PARTIAL, noise: float = 0.02):
    """Rows ``b_dec + t + 2 p_letter + noise`` (orthonormal token and letter directions) and an SAE whose
    main latent per letter reads ``p_letter`` and whose token latents read their token: an absorbing
    token latent decodes ``t + 2 p`` (full: the main latent is silenced on that token) or ``t + p`` (partial:
    the main latent fires at half strength). Returns rows, tokens, letters, the test mask and the SAE."""
    n_tokens = len(LETTERS) * (TRAIN + TEST)
    d = len(LETTERS) + n_tokens + 1
    basis = torch.eye(d)
    letter_dir = {c: basis[c] for c in LETTERS}
    b_dec = 4 * basis[0] + basis[-1]  # along a's probe: the latents do not reconstruct it
    d_sae = len(LETTERS) + n_tokens
    W_enc, W_dec = torch.zeros(d, d_sae), torch.zeros(d_sae, d)
    for c in LETTERS:
        W_enc[:, c], W_dec[c] = letter_dir[c], letter_dir[c]
    rows, tokens, letters, test = [], [], [], []
    token = 0
    for c, name in LETTERS.items():
        for split, count in (("train", TRAIN), ("test", TEST)):
            for i in range(count):
                t_dir, latent = basis[len(LETTERS) + token], len(LETTERS) + token
                if i in full.get(name, {}).get(split, []):
                    W_enc[:, c] -= 3 * t_dir  # the main latent: 2 - 3 < 0 on this token
                    W_enc[:, latent], W_dec[latent] = 5 ** 0.5 * t_dir, (t_dir + 2 * letter_dir[c]) / 5 ** 0.5
                elif i in partial.get(name, {}).get(split, []):
                    W_enc[:, c] -= t_dir  # the main latent: 2 - 1 = 1 on this token
                    W_enc[:, latent], W_dec[latent] = 2 ** 0.5 * t_dir, (t_dir + letter_dir[c]) / 2 ** 0.5
                else:
                    W_enc[:, latent], W_dec[latent] = t_dir, t_dir
                for _ in range(OCCURRENCES):
                    rows.append(b_dec + t_dir + 2 * letter_dir[c])
                    tokens.append(token)
                    letters.append(c)
                    test.append(split == "test")
                token += 1
    x = torch.stack(rows) + noise * torch.randn(len(rows), d, generator=torch.Generator().manual_seed(0))
    sae = build_sae(ReLUConfig(d_sae=d_sae), d)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.copy_(b_dec)
    sae.set_input_scale(1.0)
    return x, torch.tensor(tokens), torch.tensor(letters), torch.tensor(test), sae


def test_measured_absorption_equals_the_planted_one() -> None:
    x, tokens, letters, test, sae = _planted()
    result = measure_absorption(x, tokens, letters, test, sae, AbsorptionSettings())
    by_letter = {r.letter: r for r in result.letters if r.scored}
    assert set(by_letter) == {"a", "b", "c"} and all(r.probe_f1 == 1.0 for r in by_letter.values())
    # the k-sparse probes find each letter's main latent alone (index = letter)
    assert {name: r.main_latents for name, r in by_letter.items()} == {"a": [0], "b": [1], "c": [2]}
    assert all(r.true_positives == TEST * OCCURRENCES for r in by_letter.values())
    # full absorption: 3 of a's 10 test tokens; none on b; c's absorbing latents share with the main one
    assert [by_letter[n].full_absorption_rate for n in "abc"] == [0.3, 0.0, 0.0]
    # the absorption fraction: 1 on a's absorbed tokens, 1/2 on c's (its latent carries half), else 0
    fractions = [by_letter[n].absorption_fraction for n in "abc"]
    assert fractions == pytest.approx([0.3, 0.0, 0.5 * 0.5], abs=0.01)
    metrics = result.metrics()
    assert metrics["absorption_rate"] == pytest.approx(0.1)
    assert metrics["absorption_fraction"] == pytest.approx((0.3 + 0.25) / 3, abs=0.01)
    assert metrics["absorption_letters"] == 3 and metrics["absorption_split_features"] == 1.0
    assert metrics["absorption_true_positives"] == 3 * TEST * OCCURRENCES
    assert metrics["absorption_rate_ci_low"] <= 0.1 <= metrics["absorption_rate_ci_high"]


def test_without_absorbing_latents_nothing_is_absorbed() -> None:
    x, tokens, letters, test, sae = _planted(full={}, partial={})
    metrics = measure_absorption(x, tokens, letters, test, sae, AbsorptionSettings()).metrics()
    assert metrics["absorption_rate"] == 0.0 and metrics["absorption_fraction"] == pytest.approx(0.0)
    assert metrics["absorption_letters"] == 3


def test_letters_whose_probe_is_weak_are_not_scored() -> None:
    x, tokens, letters, test, sae = _planted()
    result = measure_absorption(x, tokens, letters, test, sae, AbsorptionSettings(min_probe_f1=1.0))
    metrics = result.metrics()
    assert metrics["absorption_letters"] == 0 and math.isnan(metrics["absorption_rate"])
    assert metrics["absorption_probe_f1"] == 1.0  # still reported: why nothing was scored


def test_absorption_per_row_by_hand() -> None:
    # probe along e0; latent 0 (main) decodes e0, latent 1 decodes (e0 + e1)/sqrt2, latent 2 decodes e1
    decoder = torch.tensor([[1.0, 0.0], [2 ** -0.5, 2 ** -0.5], [0.0, 1.0]])
    x = torch.tensor([[2.0, 1.0], [2.0, 1.0], [2.0, 1.0], [2.0, 0.0]])  # projection on the probe: 2
    z = torch.tensor([[0.0, 2 * 2 ** 0.5, 0.0],  # main silent, latent 1 carries all 2: full, fraction 1
                      [1.0, 2 ** 0.5, 0.0],  # main 1, latent 1 the other 1: fraction 1 / (1 + 1)
                      [1.5, 0.5 * 2 ** 0.5, 0.0],  # latent 1 carries 0.5, under 0.4 of 2: no absorption
                      [0.0, 0.0, 1.0]])  # nothing along the probe from any latent: neither
    fraction, full = absorption_per_row(x, z, decoder, torch.zeros(2), torch.tensor([3.0, 0.0]), [0])
    assert fraction.tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert full.tolist() == [True, False, False, False]


def test_first_letters_from_the_tokenizer() -> None:
    assert [first_letter(t) for t in [" Sam", "the", " x", "Zoo", " 12", "ab1", "", " ", "  to", "é"]] == \
        [18, 19, 23, 25, -1, -1, -1, -1, -1, -1]

    class Words:
        def decode(self, ids: list[int]) -> str:
            return [" Sam", "the", ".", " sun"][ids[0]]

    rows = LetterRows(Words(), per_token=2, max_rows=100)
    rows.update(torch.arange(12.0).reshape(6, 2), torch.tensor([0, 0, 0, 2, 3, 1]))
    acts, tokens, letters = rows.result()
    assert tokens.tolist() == [0, 0, 3, 1] and letters.tolist() == [18, 18, 18, 19]  # at most 2 of " Sam"
    assert acts[:, 0].tolist() == [0.0, 2.0, 8.0, 10.0]


def test_split_keeps_each_token_on_one_side() -> None:
    tokens = torch.tensor([5, 5, 6, 7, 7, 7, 8, 9, 9, 10])
    test = split_by_token(tokens, 0.4, seed=1)
    assert all(len(set(test[tokens == t].tolist())) == 1 for t in tokens.unique())
    assert tokens[test].unique().numel() == 2
    assert torch.equal(test, split_by_token(tokens, 0.4, seed=1))


def test_logistic_fit_is_at_the_penalised_optimum() -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 40, 3, generator=g)
    truth = torch.rand(2, 40, generator=g) < torch.sigmoid(features[..., 0] * 2)
    w = fit_logistic(features, truth).double()
    A = torch.cat([features.double(), torch.ones(2, 40, 1, dtype=torch.float64)], -1)
    n_pos = truth.sum(1, keepdim=True).double()
    c = torch.where(truth, 40 / (2 * n_pos), 40 / (2 * (40 - n_pos)))  # balanced class weights
    p = torch.sigmoid(torch.einsum("pnk,pk->pn", A, w))
    grad = torch.einsum("pnk,pn->pk", A, c * (p - truth.double()))
    grad[:, :3] += w[:, :3]  # the L2 term, intercept not penalised
    assert grad.abs().max() < 1e-4


KEYS = {"absorption_rate", "absorption_fraction", "absorption_split_features", "absorption_letters",
        "absorption_probe_f1", "absorption_true_positives", "absorption_rows", "absorption_distinct_tokens",
        "absorption_rate_ci_low", "absorption_rate_ci_high", "absorption_fraction_ci_low",
        "absorption_fraction_ci_high"}


def test_absorption_metrics_from_a_models_rows(tiny_gpt2) -> None:
    tokens = torch.randint(3, len(tiny_gpt2.tokenizer), (8, 16), generator=torch.Generator().manual_seed(0))
    hook = HookPoint(1, "mlp_post")
    acts = tiny_gpt2.activations(tokens, [hook])[hook].flatten(0, 1)
    rows = LetterRows(tiny_gpt2.tokenizer, per_token=2, max_rows=1000)
    for chunk, ids in zip(acts.split(50), tokens.flatten().split(50), strict=True):
        rows.update(chunk, ids)
    torch.manual_seed(0)
    metrics = absorption_metrics(rows, build_sae(ReLUConfig(d_sae=64), acts.shape[1]), AbsorptionSettings())
    assert set(metrics) == KEYS and metrics["absorption_rows"] == rows.n_rows > 0
    empty = absorption_metrics(LetterRows(tiny_gpt2.tokenizer, 2, 10), None, AbsorptionSettings())
    assert set(empty) == KEYS and empty["absorption_rows"] == 0 and math.isnan(empty["absorption_rate"])
