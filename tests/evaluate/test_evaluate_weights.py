"""evaluate/weights.py on hand-built weights whose cosines are known."""

import pytest
import torch

from sae_lightning.evaluate.weights import latent_weight_stats, max_cosine_similarity
from sae_lightning.saes import build_sae
from sae_lightning.saes.relu import ReLUConfig

# unit directions [1,0], [.6,.8], [0,1], [-1,0], stored with different lengths (cosine ignores them).
# pairwise cosines: (0,1) .6, (0,2) 0, (0,3) -1, (1,2) .8, (1,3) -.6, (2,3) 0
ROWS = torch.tensor([[2.0, 0.0], [0.3, 0.4], [0.0, 5.0], [-1.0, 0.0]])
MAX_COS = torch.tensor([0.6, 0.8, 0.8, 0.0])


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_max_cosine_by_hand_for_any_chunking(chunk: int) -> None:
    torch.testing.assert_close(max_cosine_similarity(ROWS, chunk=chunk), MAX_COS)
    assert float(max_cosine_similarity(ROWS, chunk=chunk).mean()) == pytest.approx(2.2 / 4)


def test_duplicate_direction_has_max_cosine_one() -> None:
    rows = torch.cat([ROWS, 3 * ROWS[:1]])
    assert max_cosine_similarity(rows)[0] == pytest.approx(1.0)
    assert max_cosine_similarity(rows)[4] == pytest.approx(1.0)


def test_latent_weight_stats_by_hand() -> None:
    sae = build_sae(ReLUConfig(d_sae=4), 2)
    sae.set_input_scale(2.0)
    with torch.no_grad():
        sae.W_dec.copy_(ROWS)
        # encoder columns: latent i's encoder direction is ROWS[i] rotated by 90 degrees for latent 0 only
        sae.W_enc.copy_(torch.stack([torch.tensor([0.0, 1.0]), *ROWS[1:]]).T)
        sae.b_enc.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    stats = latent_weight_stats(sae)
    # ||e_i|| = 1, .5, 5, 1, times s = 2 (raw-activation units)
    torch.testing.assert_close(stats["encoder_norm"], torch.tensor([2.0, 1.0, 10.0, 2.0]))
    torch.testing.assert_close(stats["encoder_bias"], torch.tensor([0.1, -0.2, 0.3, 0.0]))
    torch.testing.assert_close(stats["encoder_decoder_cosine_sim"], torch.tensor([0.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(stats["max_decoder_cosine_sim"], MAX_COS)
    # encoder directions [0,1], [.6,.8], [0,1], [-1,0]: latent 0 and 2 coincide
    torch.testing.assert_close(stats["max_encoder_cosine_sim"], torch.tensor([1.0, 0.8, 1.0, 0.0]))
