"""LLaVA-NeXT anyres maths against transformers' own functions, and M3's per-crop token counts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from m3cli.families import anyres as A
from m3cli.matryoshka.scales import BudgetError, pool

hf_utils = pytest.importorskip("transformers.image_processing_utils")
hf_next = pytest.importorskip("transformers.models.llava_next.modeling_llava_next")

V16 = [list(p) for p in A.V16_PINPOINTS]
# LLaVA-1.6's pinpoints scaled to the tiny tower's 48 px tiles (336 -> 48)
TINY_PINS = [[48, 96], [96, 48], [96, 96], [144, 48], [48, 144]]
SCALES = (576, 144, 36, 9, 1)

# (h, w): small (both 1x2/2x1 ties), wide, tall, square, extreme and odd aspect ratios
V16_SIZES = [
    (300, 200), (200, 300), (336, 336), (336, 672), (672, 336), (672, 672), (1000, 1000), (480, 640),
    (640, 480), (400, 1000), (1000, 400), (1008, 336), (336, 1008), (333, 777), (777, 333), (55, 176),
    (88, 99), (197, 197), (1080, 1920), (1920, 1080), (3000, 400), (401, 3001), (1, 1), (2, 900),
    (720, 1280), (999, 1001), (235, 1128), (1128, 94),
]
TINY_SIZES = [
    (48, 48), (48, 96), (96, 48), (96, 96), (40, 30), (30, 40), (60, 100), (100, 60), (144, 48), (48, 144),
    (71, 113), (113, 71), (200, 200), (37, 250), (250, 37), (97, 98), (143, 47), (11, 13),
]


def _grid_sizes() -> list[tuple[int, int]]:
    rng = np.random.default_rng(7)
    return V16_SIZES + [tuple(int(v) for v in rng.integers(20, 2500, 2)) for _ in range(150)]


# --- resolution choice and layout ----------------------------------------------------------------------


@pytest.mark.parametrize("pins", [V16, TINY_PINS, [[336, 336], [336, 1344], [1344, 336], [672, 672]]])
def test_select_best_resolution_equals_transformers(pins):
    for size in _grid_sizes() + TINY_SIZES:
        assert A.select_best_resolution(size, pins) == tuple(hf_utils.select_best_resolution(size, pins)), size


def test_grid_shape_and_crop_count_equal_transformers():
    for pins, tile, sizes in ((V16, 336, _grid_sizes()), (TINY_PINS, 48, TINY_SIZES)):
        for size in sizes:
            assert A.grid_shape(size, pins, tile) == tuple(hf_next.get_anyres_image_grid_shape(size, pins, tile))
            assert A.crop_count(size, pins, tile) == hf_next.image_size_to_num_patches(size, pins, tile)
            lay = A.layout(size, pins, tile)
            assert lay.crops == lay.tiles_high * lay.tiles_wide + 1


def test_layouts_cover_1x2_2x1_2x2_and_3_tiles():
    shapes = {A.grid_shape(size, V16, 336) for size in V16_SIZES}
    assert {(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)} <= shapes
    assert A.grid_shape((672, 672), V16, 336) == (2, 2)
    assert A.grid_shape((336, 672), V16, 336) == (1, 2)  # h x w: one row of two tiles
    assert A.grid_shape((672, 336), V16, 336) == (2, 1)


def _original_select(size_wh, stored):
    """haotian-liu/LLaVA's choice, read from its mm_utils.py: pairs are (width, height), sizes PIL (w, h)."""
    ow, oh = size_wh
    best, eff_best, waste_best = None, 0, float("inf")
    for w, h in stored:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        if eff > eff_best or (eff == eff_best and w * h - eff < waste_best):
            best, eff_best, waste_best = (w, h), eff, w * h - eff
    return best


def test_original_pinpoint_order_breaks_ties_the_other_way():
    # The original code reads [336, 672] as width 336, height 672; transformers as height 336, width 672. The
    # set is symmetric, so only ties differ: any image within 336x336 fits 336x672 and 672x336 equally.
    orig = A.pinpoints_hw(V16, order="wh")
    for h, w in _grid_sizes():
        ow, oh = _original_select((w, h), V16)
        assert A.select_best_resolution((h, w), orig) == (oh, ow)
    assert A.grid_shape((300, 200), V16, 336) == (1, 2)  # transformers: a wide pair of tiles...
    assert A.grid_shape((300, 200), orig, 336) == (2, 1)  # ...the original: a tall pair, for the same image
    assert A.grid_shape((1000, 400), V16, 336) == A.grid_shape((1000, 400), orig, 336) == (3, 1)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        A.select_best_resolution((0, 10), V16)
    with pytest.raises(ValueError):
        A.pinpoints_hw([])
    with pytest.raises(ValueError, match="multiple"):
        A.layout((100, 100), [[100, 200]], 336)
    # a 1 px high strip keeps nothing anywhere (its scaled height truncates to 0): the first pinpoint wins, as
    # in transformers, and unpadding then leaves no tile rows, only the base crop
    assert A.select_best_resolution((1, 100000), V16) == tuple(hf_utils.select_best_resolution((1, 100000), V16))
    assert A.visual_token_count((1, 100000), V16, 336, 576) == 576


# --- unpadding ----------------------------------------------------------------------------------------------


def test_unpad_equals_transformers_on_pooled_grids():
    checked = 0
    for size in _grid_sizes():
        th, tw = A.grid_shape(size, V16, 336)
        for side in (24, 12, 6, 3, 1):
            grid = torch.arange(th * side * tw * side, dtype=torch.float32).reshape(1, th * side, tw * side)
            want = hf_next.unpad_image(grid, size)
            got = A.unpad(grid, size)
            assert torch.equal(got, want), (size, side)
            assert A.unpadded_shape((th * side, tw * side), size) == tuple(want.shape[1:])
            hwc = A.unpad(grid.permute(1, 2, 0).numpy(), size, channels_first=False)
            assert np.array_equal(hwc[..., 0], want[0].numpy())
            checked += 1
    assert checked > 500


def _original_unpad_shape(grid_hw, size_wh):
    """The original llava_arch.unpad_image's kept shape: int() truncation, PIL (w, h) size."""
    ow, oh = size_wh
    ch, cw = grid_hw
    if ow / oh > cw / ch:
        new = int(oh * (cw / ow))
        pad = (ch - new) // 2
        return ch - 2 * pad, cw
    new = int(ow * (ch / oh))
    pad = (cw - new) // 2
    return ch, cw - 2 * pad


def test_unpad_original_flavour_truncates():
    differs = 0
    for (h, w), side in itertools.product(_grid_sizes(), (24, 12, 6, 3, 1)):
        th, tw = A.grid_shape((h, w), V16, 336)
        g = (th * side, tw * side)
        assert A.unpadded_shape(g, (h, w), "original") == _original_unpad_shape(g, (w, h))
        differs += A.unpadded_shape(g, (h, w), "original") != A.unpadded_shape(g, (h, w), "hf")
    assert differs > 0
    # 55x176 on a 2x1 grid of 24s: 55 * 48 / 176 = 14.999999999999998, kept as 15 by round(.., 7), 14 by int()
    assert A.unpadded_shape((48, 48), (55, 176), "hf") == (16, 48)
    assert A.unpadded_shape((48, 48), (55, 176), "original") == (14, 48)
    with pytest.raises(ValueError):
        A.unpadded_shape((48, 48), (55, 176), "nope")


# --- packing against the model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_next():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            image_size=48, patch_size=2, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2,
        ),
        image_grid_pinpoints=TINY_PINS,
        image_token_index=63,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.image_newline.normal_()
    return model


def _features(size, dim, seed):
    th, tw = A.grid_shape(size, TINY_PINS, 48)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(th * tw + 1, 576, dim, generator=gen), th, tw


def test_pack_at_576_equals_transformers_pack_image_features(tiny_next):
    newline = tiny_next.model.image_newline.detach()
    dim = newline.shape[0]
    for i, size in enumerate(TINY_SIZES):
        feats, th, tw = _features(size, dim, i)
        with torch.no_grad():
            (want,), lens = tiny_next.model.pack_image_features(
                [feats], torch.tensor([size]), "default", image_newline=newline
            )
        got = A.pack_pooled_crops(feats[0], feats[1:], th, tw, size, newline)
        assert torch.equal(got, want), size
        assert got.shape[0] == int(lens[0]) == A.visual_token_count(size, TINY_PINS, 48, 576)
        # list-of-crops input and the numpy twin give the same sequence
        assert torch.equal(A.pack_pooled_crops(feats[0], list(feats[1:]), th, tw, size, newline), want)
        got_np = A.pack_pooled_crops(feats[0].numpy(), feats[1:].numpy(), th, tw, size, newline.numpy())
        assert np.array_equal(got_np, want.numpy())


def _reference_pack(pooled, th, tw, size, newline):
    """Token by token from the method: base tokens, then per kept grid row its kept cells, then a newline."""
    side = int(round(pooled.shape[1] ** 0.5))
    rows, cols = th * side, tw * side
    index = torch.arange(rows * cols).reshape(1, rows, cols)
    kept = hf_next.unpad_image(index, size)[0]  # transformers' own arithmetic on the POOLED grid
    out = list(pooled[0])
    for grid_row in kept:
        for flat in grid_row.tolist():
            r, c = divmod(flat, cols)
            tile = (r // side) * tw + c // side
            out.append(pooled[1 + tile][(r % side) * side + c % side])
        out.append(newline)
    return torch.stack(out)


def test_pack_at_every_scale_equals_reference(tiny_next):
    newline = tiny_next.model.image_newline.detach()
    for i, size in enumerate(TINY_SIZES):
        feats, th, tw = _features(size, newline.shape[0], 100 + i)
        for s in SCALES:
            pooled = pool(feats, s)
            got = A.pack_pooled_crops(pooled[0], pooled[1:], th, tw, size, newline)
            assert torch.equal(got, _reference_pack(pooled, th, tw, size, newline)), (size, s)
            assert got.shape[0] == A.visual_token_count(size, TINY_PINS, 48, s)
            bare = A.pack_pooled_crops(pooled[0], pooled[1:], th, tw, size, None)
            assert bare.shape[0] == A.visual_token_count(size, TINY_PINS, 48, s, newline=False)


def test_pack_keeps_autograd_and_checks_shapes():
    base = torch.randn(9, 4, requires_grad=True)
    tiles = torch.randn(2, 9, 4, requires_grad=True)
    out = A.pack_pooled_crops(base, tiles, 1, 2, (48, 96), torch.zeros(4))
    out.sum().backward()
    assert base.grad is not None and tiles.grad is not None
    with pytest.raises(ValueError, match="tiles"):
        A.pack_pooled_crops(base, tiles, 2, 2, (48, 96))
    with pytest.raises(ValueError, match="base"):
        A.pack_pooled_crops(torch.randn(4, 4), tiles, 1, 2, (48, 96))


# --- token counts -------------------------------------------------------------------------------------------


def test_counts_2x2_layout_match_the_paper():
    for size in ((672, 672), (1000, 1000), (96 * 7, 96 * 7)):
        assert A.grid_shape(size, V16, 336) == (2, 2)
        with_nl = [A.visual_token_count(size, V16, 336, s) for s in SCALES]
        without = [A.visual_token_count(size, V16, 336, s, newline=False) for s in SCALES]
        assert with_nl == [2928, 744, 192, 51, 7]
        assert without == [2880, 720, 180, 45, 5]


def test_counts_per_layout_formula():
    # no padding to remove: s (base) + (th*side) * (tw*side) + th*side newlines
    for size, (th, tw) in (((336, 672), (1, 2)), ((672, 336), (2, 1)), ((336, 1008), (1, 3)), ((1008, 336), (3, 1))):
        assert A.grid_shape(size, V16, 336) == (th, tw)
        for s in SCALES:
            side = int(s**0.5)
            assert A.visual_token_count(size, V16, 336, s) == s + th * side * tw * side + th * side
    # padding removed: 1080x1920 is a 2x2 layout whose pooled grid loses rows at 576
    assert A.visual_token_count((1080, 1920), V16, 336, 576) < 2928


def test_largest_scale_within_cap():
    size = (672, 672)
    assert A.largest_scale_within(2928, size, V16, 336) == 576
    assert A.largest_scale_within(2927, size, V16, 336) == 144
    assert A.largest_scale_within(744, size, V16, 336) == 144
    assert A.largest_scale_within("191", size, V16, 336) == 9
    assert A.largest_scale_within(7, size, V16, 336) == 1
    assert A.largest_scale_within(5, size, V16, 336, newline=False) == 1
    with pytest.raises(BudgetError, match="7"):
        A.largest_scale_within(6, size, V16, 336)
    for size in V16_SIZES[:-6]:
        for cap in (50, 200, 800, 3000):
            try:
                s = A.largest_scale_within(cap, size, V16, 336)
            except BudgetError:
                assert A.visual_token_count(size, V16, 336, 1) > cap
                continue
            assert A.visual_token_count(size, V16, 336, s) <= cap
            bigger = [t for t in SCALES if t > s]
            assert all(A.visual_token_count(size, V16, 336, t) > cap for t in bigger)


# --- crops against the image processor ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pil_processor():
    mod = pytest.importorskip("transformers.models.llava_next.image_processing_pil_llava_next")
    return mod.LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=V16,
    )


def _noise(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


CROP_SIZES = [(300, 200), (480, 640), (400, 1000), (1008, 336), (1000, 1000), (333, 777), (900, 250), (50, 700)]


def test_crops_equal_processor_pixels(pil_processor):
    for i, (h, w) in enumerate(CROP_SIZES):
        img = _noise(h, w, i)
        out = pil_processor(images=img, do_rescale=False, do_normalize=False, return_tensors="np")
        want = out["pixel_values"][0]
        crops = A.anyres_crops(img, V16, 336)
        assert len(crops) == A.crop_count((h, w), V16, 336) == want.shape[0]
        assert all(c.mode == "RGB" and c.size == (336, 336) for c in crops)
        mine = np.stack([np.asarray(c).transpose(2, 0, 1) for c in crops])
        assert np.array_equal(mine, want), (h, w)
        assert list(out["image_sizes"][0]) == [h, w]


def test_crops_equal_processor_after_normalisation(pil_processor):
    mean = np.array(pil_processor.image_mean, dtype=np.float32)[:, None, None]
    std = np.array(pil_processor.image_std, dtype=np.float32)[:, None, None]
    for i, (h, w) in enumerate(CROP_SIZES[:4]):
        img = _noise(h, w, 50 + i)
        want = pil_processor(images=img, return_tensors="np")["pixel_values"][0]
        crops = A.anyres_crops(img, V16, 336)
        mine = np.stack([(np.asarray(c).transpose(2, 0, 1) / 255.0 - mean) / std for c in crops])
        np.testing.assert_allclose(mine, want, atol=1e-5)


def test_crop_geometry_base_squashed_and_padding():
    # a solid image 300 high, 600 wide on a 672x672 canvas... is a 1x2 layout: exactly 336x672, no padding
    img = Image.new("RGB", (600, 300), (200, 10, 10))
    crops = A.anyres_crops(img, V16, 336)
    assert len(crops) == 3
    assert all(np.all(np.asarray(c) == (200, 10, 10)) for c in crops)
    # a 100 high x 500 wide image -> 336x672 canvas, resized to 135x672, centred: black bands top and bottom
    img = Image.new("RGB", (500, 100), (10, 200, 10))
    base, left, right = A.anyres_crops(img, V16, 336)
    assert np.all(np.asarray(base) == (10, 200, 10))  # squashed to 336x336, no padding in the base crop
    top_band = (336 - A.fit_size((100, 500), (336, 672))[0]) // 2
    assert A.fit_size((100, 500), (336, 672)) == (135, 672)
    arr = np.asarray(left)
    assert np.all(arr[: top_band - 1] == 0) and np.all(arr[-top_band + 1 :] == 0)
    assert np.all(arr[top_band + 2 : 336 - top_band - 2] == (10, 200, 10))
    grey = A.anyres_crops(img, V16, 336, pad_color=A.CLIP_MEAN_RGB)[2]
    assert tuple(np.asarray(grey)[0, 0]) == A.CLIP_MEAN_RGB
    # tiles are row-major: a 2x2 layout of a four-colour image
    quad = Image.new("RGB", (672, 672))
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        quad.paste(colour, ((k % 2) * 336, (k // 2) * 336, (k % 2 + 1) * 336, (k // 2 + 1) * 336))
    tiles = A.anyres_crops(quad, V16, 336)[1:]
    assert [tuple(np.asarray(t)[168, 168]) for t in tiles] == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def test_crops_of_non_rgb_images():
    img = Image.new("L", (200, 300), 128)
    crops = A.anyres_crops(img, V16, 336)
    assert len(crops) == 3 and all(c.mode == "RGB" for c in crops)
    assert A.image_hw(img) == (300, 200)
