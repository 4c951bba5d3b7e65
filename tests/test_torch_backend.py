import pytest
import torch
from PIL import Image

from m3cli.answering.core import ask_images
from m3cli.backends.base import AnswerRequest, ModelLoadError
from m3cli.backends.torch import TorchBackend
from m3cli.matryoshka.policy import Fixed

Q = "what colour is the background?"


def _images():
    return [Image.new("RGB", (48, 48), (200, 30, 30)), Image.new("RGB", (64, 48), (20, 30, 200)),
            Image.effect_noise((48, 48), 80).convert("RGB")]


def test_encode_returns_full_projected_grid(tiny_backend):
    enc = tiny_backend.encode(_images())
    assert len(enc) == 3
    assert enc[0].grid.shape == (576, tiny_backend.model.config.text_config.hidden_size)
    assert tiny_backend.grid_side == 24
    assert tiny_backend.scales == [576, 144, 36, 9, 1]


def test_prompt_has_exactly_scale_placeholders(tiny_backend):
    for scale in (576, 36, 1):
        ids = tiny_backend.prompt_ids(Q, scale)
        assert ids.count(tiny_backend.image_token_id) == scale


def test_parity_with_stock_generate_at_576(tiny_backend):
    """At the full grid our pooled-feature path equals transformers' own generate(pixel_values)."""
    model, proc = tiny_backend.model, tiny_backend.processor
    for image in _images():
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]}]
        text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = proc(images=[image], text=[text], return_tensors="pt")
        assert inputs.input_ids[0].tolist() == tiny_backend.prompt_ids(Q, 576)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                 return_dict_in_generate=True, output_scores=True)
        stock_ids = out.sequences[0, inputs.input_ids.shape[1]:].tolist()
        stock_lp = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0].tolist()
        enc = tiny_backend.encode([image])[0]
        ours = tiny_backend.answer([AnswerRequest(enc, 576, Q, max_new_tokens=6)])[0]
        eos = tiny_backend.eos_ids
        expected = []
        for tok in stock_ids:
            if tok in eos:
                break
            expected.append(tok)
        assert ours.token_ids == expected
        assert ours.logprobs == pytest.approx(stock_lp[: len(expected)], abs=1e-4)


def test_every_scale_answers_and_batches_match_single(tiny_backend):
    images = _images()
    enc = tiny_backend.encode(images)
    questions = [Q, "how many shapes are there?", "is there a red circle?"]
    for scale in tiny_backend.scales:
        reqs = [AnswerRequest(e, scale, q, 5) for e, q in zip(enc, questions, strict=False)]
        batched = tiny_backend.answer(reqs)
        single = [tiny_backend.answer([r])[0] for r in reqs]
        assert [g.token_ids for g in batched] == [g.token_ids for g in single]
        for g in batched:
            assert len(g.token_ids) == len(g.logprobs)
            assert all(lp <= 0 for lp in g.logprobs)


def test_mixed_budgets_in_one_batch(tiny_backend):
    enc = tiny_backend.encode(_images()[:2])
    mixed = tiny_backend.answer([AnswerRequest(enc[0], 1, Q, 4), AnswerRequest(enc[1], 576, Q, 4)])
    alone = [tiny_backend.answer([AnswerRequest(enc[0], 1, Q, 4)])[0],
             tiny_backend.answer([AnswerRequest(enc[1], 576, Q, 4)])[0]]
    assert [g.token_ids for g in mixed] == [g.token_ids for g in alone]


def test_pooling_changes_what_the_lm_sees(tiny_backend):
    image = Image.effect_noise((48, 48), 120).convert("RGB")
    enc = tiny_backend.encode([image])[0]
    lps = {s: tiny_backend.answer([AnswerRequest(enc, s, Q, 1)])[0].logprobs[0] for s in (576, 1)}
    assert lps[576] != lps[1]


def test_ask_images_records_timings(tiny_backend):
    res = ask_images(tiny_backend, _images()[:1], [Q], [Fixed(9)], max_new_tokens=3)[0]
    assert res.tokens == 9
    assert [r.scale for r in res.scales_tried] == [9]
    assert 0.0 <= res.confidence <= 1.0
    assert set(res.timings) >= {"encode_ms", "prefill_ms", "decode_ms", "total_ms"}
    assert res.timings["encode_ms"] > 0


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        TorchBackend(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        TorchBackend(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as info:
        TorchBackend(str(bad))
    assert "\n" not in str(info.value)


def test_dropping_unused_tower_layers_keeps_features(tiny_model_dir, tiny_backend):
    """The backend drops the vision layer LLaVA never reads; features equal the full tower's."""
    from transformers import LlavaForConditionalGeneration

    full = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    assert full.config.vision_feature_layer == -2
    assert len(tiny_backend.model.model.vision_tower.encoder.layers) == len(full.model.vision_tower.encoder.layers) - 1
    images = _images()
    pixels = tiny_backend.pixel_values(images)
    with torch.inference_mode():
        expected = full.model.get_image_features(pixel_values=pixels).pooler_output
    got = tiny_backend.encode(images)
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(e, g.grid, atol=1e-6)
