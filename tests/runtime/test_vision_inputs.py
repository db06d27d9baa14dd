"""Host-side grid tensors and M-RoPE ids (numpy) equal transformers' Qwen3-VL torch computations."""

from __future__ import annotations

import numpy as np
import pytest

from egm_edge.runtime.mrope import decode_position_ids, rope_index
from egm_edge.runtime.vision_inputs import VisionGridConfig, image_token_counts, vision_grid_inputs

CFG = VisionGridConfig(head_dim=32, rope_theta=10000.0, num_grid_per_side=24, spatial_merge_size=2, patch_size=16, temporal_patch_size=2)
GRIDS = [[(1, 4, 6)], [(1, 16, 20), (1, 22, 14)], [(2, 8, 4)], [(1, 2, 2), (1, 48, 64)]]


@pytest.mark.parametrize("grids", GRIDS)
def test_grid_inputs_match_transformers(grids):
    torch = pytest.importorskip("torch")
    vu = pytest.importorskip("transformers.vision_utils")
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionRotaryEmbedding

    g = torch.tensor(grids)
    idx, wts = vu.get_vision_interpolation_indices_and_weights(g, num_grid_per_side=CFG.num_grid_per_side, mode="bilinear",
                                                               align_corners=True, spatial_merge_size=CFG.spatial_merge_size)
    pos = vu.get_vision_position_ids(g, CFG.spatial_merge_size)
    cu, _ = vu.get_vision_attention_seqlens(g, Qwen3VLVisionConfig(hidden_size=64, num_heads=2))
    rope = Qwen3VLVisionRotaryEmbedding(Qwen3VLVisionConfig(hidden_size=64, num_heads=2))
    cos, sin = rope(torch.zeros(1), pos)

    ours = vision_grid_inputs(grids, CFG)
    np.testing.assert_array_equal(ours["pos_embed_indices"], idx.numpy())
    np.testing.assert_allclose(ours["pos_embed_weights"], wts.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours["rotary_cos"], cos.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours["rotary_sin"], sin.numpy(), atol=1e-5)
    bounds = np.flatnonzero(np.diff(ours["segment_ids"])) + 1
    np.testing.assert_array_equal(np.concatenate([[0], bounds, [ours["segment_ids"].size]]), cu.numpy())


def test_grid_inputs_reject_bad_grids():
    with pytest.raises(ValueError, match="multiples of 2"):
        vision_grid_inputs([(1, 3, 4)], CFG)
    with pytest.raises(ValueError, match="at least one"):
        vision_grid_inputs([], CFG)
    assert image_token_counts([(1, 4, 6), (2, 2, 2)], 2) == [6, 2]
    assert VisionGridConfig.from_dict(CFG.to_dict()) == CFG


def _prompt(runs, image_id=9, start=7, end=8):
    ids = [1, 2]
    for n in runs:
        ids += [start] + [image_id] * n + [end, 3]
    return ids + [4, 5]


def test_rope_index_matches_transformers_with_padding_and_two_images():
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    grids = [(1, 4, 6), (1, 8, 4), (1, 2, 2)]
    a, b = _prompt([6, 8]), _prompt([1])
    width = max(len(a), len(b)) + 2
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    ids[0, width - len(a):], mask[0, width - len(a):] = a, 1  # left padding
    ids[1, :len(b)], mask[1, :len(b)] = b, 1  # right padding
    fake = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2)),
                           get_vision_position_ids=lambda *a, **k: Qwen3VLModel.get_vision_position_ids(None, *a, **k))
    t_ids = torch.from_numpy(ids)
    ref_pos, ref_delta = Qwen3VLModel.get_rope_index(fake, t_ids, (t_ids == 9).int(), torch.tensor(grids), attention_mask=torch.from_numpy(mask))
    pos, delta = rope_index(ids, grids, image_token_id=9, spatial_merge_size=2, attention_mask=mask)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy().ravel())
    nxt = decode_position_ids(mask.sum(1), delta, 2)
    assert nxt.shape == (3, 2, 2)
    np.testing.assert_array_equal(nxt[:, :, 0], np.broadcast_to(pos.max(axis=(0, 2)) + 1, (3, 2)))


def test_rope_index_checks_grid_counts():
    ids = np.asarray([_prompt([6])])
    with pytest.raises(ValueError, match="does not match grid"):
        rope_index(ids, [(1, 4, 4)], 9, 2)
    with pytest.raises(ValueError, match="image grid"):
        rope_index(ids, [(1, 4, 6), (1, 2, 2)], 9, 2)
    pos, delta = rope_index(np.asarray([[1, 2, 3]]), [], 9, 2)
    np.testing.assert_array_equal(pos[0, 0], [0, 1, 2])
    assert delta.tolist() == [0]
