"""``m3 bench ... --shape``: paper-scale architectures with random weights, checked on the hidden ``tiny`` shape
(same code path, toy sizes). The real 7B/13B shapes are only ever built on the meta device here."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from m3cli.bench import shape_model, shapes
from m3cli.bench.shape_model import ShapeWeights, build_shape, shape_backend
from m3cli.bench.shapes import (
    ShapeMemoryError,
    check_memory,
    cpu_has_bf16,
    meminfo_available,
    param_count,
    resolve_shape,
    shape_config,
)
from m3cli.cli import cli
from m3cli.errors import UsageError

QUESTION = "what colour is the background?"


@pytest.fixture(scope="module")
def tiny_built():
    return build_shape(resolve_shape("tiny"), "cpu", torch.float32)


def _table_rows(text: str) -> list[list[str]]:
    """Body rows of every markdown table in ``text``, as stripped cells."""
    out = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            out.append([c.strip() for c in line.strip().strip("|").split("|")])
    return out


# -- the shapes themselves ------------------------------------------------------------------------
def test_real_shapes_have_the_published_parameter_counts():
    # llava-hf/llava-1.5-7b-hf and -13b-hf: CLIP ViT-L/14-336 + mlp2x_gelu + Llama-2 (untied head, vocab 32064)
    assert param_count(resolve_shape("llava-1.5-7b")) == 7_063_427_072
    assert param_count(resolve_shape("llava-1.5-13b")) == 13_351_494_656
    cfg = shape_config(resolve_shape("llava-1.5-7b"))
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1024, 24, 16, 4096)
    assert (v.image_size, v.patch_size, cfg.vision_feature_layer) == (336, 14, -2)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (4096, 32, 32, 11008)
    assert t.vocab_size == 32064 and not cfg.tie_word_embeddings
    t13 = shape_config(resolve_shape("llava-1.5-13b")).text_config
    assert (t13.hidden_size, t13.num_hidden_layers, t13.num_attention_heads, t13.intermediate_size) == \
        (5120, 40, 40, 13824)


def test_llava_next_shape_is_the_16_architecture():
    shape = resolve_shape("llava-next-7b")
    # llava-hf/llava-v1.6-vicuna-7b-hf: LLaVA-1.5-7B's parameters plus the learned image_newline (4096)
    assert param_count(shape) == 7_063_427_072 + 4096
    cfg = shape_config(shape)
    assert type(cfg).__name__ == "LlavaNextConfig"
    assert [tuple(p) for p in cfg.image_grid_pinpoints] == [(336, 672), (672, 336), (672, 672), (1008, 336),
                                                             (336, 1008)]
    assert shape.max_visual_rows == 2928          # a 2x2 layout at 576 per crop: 5 x 576 + 48 newlines
    assert "anyres" in shape.describe() and "llava-next-7b" in shapes.shape_names()


def test_resolve_shape_errors_and_layer_cut():
    with pytest.raises(UsageError, match="unknown --shape"):
        resolve_shape("llava-9b")
    cut = resolve_shape("llava-1.5-7b", layers=2)
    assert cut.text_layers == 2 and cut.full_text_layers == 32 and cut.model_id == "shape:llava-1.5-7b@2of32L"
    assert "cut to 2 of 32 layers" in cut.describe()
    with pytest.raises(UsageError, match="has 32 layers"):
        resolve_shape("llava-1.5-7b", layers=33)
    assert "tiny" not in shapes.shape_names()


def test_tokenizer_is_padded_to_the_vocabulary(tiny_built):
    tok = tiny_built.processor.tokenizer
    assert len(tok) == 512 == tiny_built.model.config.text_config.vocab_size
    text = tiny_built.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True, tokenize=False)
    assert text.startswith(shape_model.VICUNA_V1_SYSTEM + " USER: <image>\n") and text.endswith("ASSISTANT:")
    assert tok.decode([511]) == "<unused511>"


def test_weights_are_deterministic_named_and_buffers_real(tiny_built):
    from transformers import LlavaForConditionalGeneration

    model = tiny_built.model
    weights = ShapeWeights(tiny_built.shape)
    for name, param in model.named_parameters():  # every parameter is regenerable on its own, by name
        assert torch.equal(weights.tensor(name), param), name
    ref = LlavaForConditionalGeneration(shape_config(tiny_built.shape, tiny_built.processor.tokenizer))
    for (name, buf), (_, want) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        assert torch.equal(buf, want), name  # position ids, rotary frequencies: as a normal construction
    lm = model.model.language_model
    assert torch.equal(lm.norm.weight, torch.ones_like(lm.norm.weight))
    assert not torch.equal(lm.layers[0].mlp.up_proj.weight, lm.layers[1].mlp.up_proj.weight)
    head = model.lm_head.weight
    assert len({tuple(head[i, :8].tolist()) for i in range(head.shape[0])}) == head.shape[0]  # no tied logits


def test_the_backend_is_the_project_torch_backend_with_eos_suppressed(tiny_built):
    from m3cli.backends.base import AnswerRequest
    from m3cli.backends.torch import TorchBackend
    from m3cli.bench.scenes import bench_image

    fresh = build_shape(tiny_built.shape, "cpu", torch.float32)  # the backend drops a tower layer in place
    backend = shape_backend(fresh)
    assert isinstance(backend, TorchBackend) and backend.model_id == "shape:tiny"
    assert backend.scales == [576, 144, 36, 9, 1] and backend.eos_ids == set()
    assert len(backend.model.model.vision_tower.encoder.layers) == tiny_built.shape.vision_layers - 1
    grid = backend.encode([bench_image()])[0]
    gens = backend.answer([AnswerRequest(grid, s, QUESTION, 5) for s in backend.scales])
    assert [len(g.token_ids) for g in gens] == [5] * 5
    # the same random model, untouched, through stock transformers: the same grid features
    with torch.inference_mode():
        pixels = tiny_built.processor.image_processor([bench_image()], return_tensors="pt")["pixel_values"]
        stock = tiny_built.model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2)
    stock = stock.pooler_output[0] if hasattr(stock, "pooler_output") else stock[0]
    torch.testing.assert_close(grid.grid, stock.reshape(grid.grid.shape))


# -- dtype and memory ---------------------------------------------------------------------------
def test_cpu_flags_and_meminfo_parsing(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert cpu_has_bf16(shapes.cpu_flags(str(cpuinfo)))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert not cpu_has_bf16(shapes.cpu_flags(str(cpuinfo)))
    assert shapes.cpu_flags(str(tmp_path / "missing")) == set()
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683584 kB\nMemFree:  100 kB\nMemAvailable:   1000 kB\n")
    assert meminfo_available(str(meminfo)) == 1000 * 1024
    assert meminfo_available(str(tmp_path / "missing")) is None


def test_check_memory_refuses_in_one_line():
    shape = resolve_shape("llava-1.5-7b")
    n = param_count(shape)
    need = check_memory(shape, torch.bfloat16, "cpu", n_params=n, available=(10**12, "test"))
    assert 1.1 * 2 * n < need < 1.1 * 2 * n + 4 * 2**30
    with pytest.raises(ShapeMemoryError) as err:
        check_memory(shape, torch.bfloat16, "cpu", batch=16, n_params=n, available=(8 * 2**30, "MemAvailable"))
    assert "\n" not in str(err.value) and "8.0 GiB is free (MemAvailable)" in str(err.value)
    assert check_memory(shape, torch.bfloat16, "cpu", n_params=n, available=(None, "unknown")) == need


def test_cli_refuses_when_memory_is_short(monkeypatch):
    monkeypatch.setattr(shapes, "meminfo_available", lambda path="/proc/meminfo": 2**20)
    res = CliRunner().invoke(cli, ["bench", "latency", "--shape", "tiny"])
    assert res.exit_code == 2
    assert "needs ~" in res.output and "GiB is free" in res.output and len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["latency", "--shape", "tiny", "--model", "x"], "drop --model"),
    (["latency", "--layers", "2"], "--layers needs --shape"),
    (["batch", "--shape", "tiny", "--backend", "llamacpp"], "torch backend"),
    (["batch", "--tokens", "9"], "need --shape"),
    (["batch", "--shape", "tiny", "--tokens", "10"], "not a nested scale"),
    (["gguf", "--shape", "llava-next-7b"], "does not write LLaVA-NeXT pairs"),
])
def test_cli_shape_flag_errors(args, message):
    res = CliRunner().invoke(cli, ["bench", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output


# -- every command on the tiny shape ------------------------------------------------------------
def test_bench_latency_shape_table():
    res = CliRunner().invoke(cli, ["bench", "latency", "--shape", "tiny", "--dtype", "float32",
                                   "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert "RANDOM weights" in res.stdout and "exactly 3 new tokens" in res.stdout
    rows = _table_rows(res.stdout)
    assert rows[0] == ["tokens", "encode ms", "prefill ms", "decode ms", "new tokens", "total ms", "prefill vs max",
                       "total vs max", "decode ms/token", "prompt tokens", "prefill ms/row", "prefill ms p90",
                       "total ms p90", "spread"]
    body = rows[1:]
    assert [r[0] for r in body] == ["576", "144", "36", "9", "1"]
    assert all(r[4] == "3.0" for r in body)
    prompt = [int(r[9]) for r in body]
    assert [p - prompt[-1] for p in prompt] == [575, 143, 35, 8, 0]  # the same text around each scale


def test_bench_latency_and_batch_on_a_next_shape(tmp_path):
    """The NeXT shape through the project's own NeXT path: crops, per-crop pooling, newlines, and the stock
    generate loop (LlavaNextProcessor + generate) as the naive baseline."""
    res = CliRunner().invoke(cli, ["bench", "latency", "--shape", "tiny-next", "--dtype", "float32",
                                   "--max-new-tokens", "2", "--tokens", "576,9"])
    assert res.exit_code == 0, res.output
    assert "anyres" in res.stdout
    body = _table_rows(res.stdout)[1:]
    assert [r[0] for r in body] == ["576", "9"]
    # the bench scene's crops and newlines, not the per-crop scale, make the prompt
    assert int(body[0][9]) - int(body[1][9]) > 576 - 9
    res = CliRunner().invoke(cli, ["bench", "batch", "--shape", "tiny-next", "--dtype", "float32", "-n", "2",
                                   "--batch-size", "2", "--max-new-tokens", "2", "--tokens", "576,9",
                                   "--naive-n", "1", "--workdir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = _table_rows(res.stdout)
    assert rows[1][0].startswith("naive loop") and rows[1][5] == "2.0"
    assert [r[0] for r in rows[2:4]] == ["m3 batch --tokens 576 --batch-size 2", "m3 batch --tokens 9 --batch-size 2"]


def test_bench_batch_shape_with_amdahl_view(tmp_path):
    res = CliRunner().invoke(cli, ["bench", "batch", "--shape", "tiny", "--dtype", "float32", "-n", "3",
                                   "--batch-size", "2", "--max-new-tokens", "2", "--tokens", "576,9",
                                   "--naive-n", "1", "--workdir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = _table_rows(res.stdout)
    assert rows[0] == ["run", "items", "seconds", "items/s", "vs naive", "new tokens/answer", "ms/item p50",
                       "ms/item p90", "spread"]
    assert rows[1][0].startswith("naive loop") and rows[1][1] == "1" and rows[1][5] == "2.0"
    assert [r[0] for r in rows[2:4]] == ["m3 batch --tokens 576 --batch-size 2", "m3 batch --tokens 9 --batch-size 2"]
    assert all(r[5] == "2.0" for r in rows[2:4])
    amdahl = rows[4:]
    assert amdahl[0] == ["tokens", "encode ms/item", "LM ms/item", "wall ms/item", "speed-up vs 576", "Amdahl bound",
                         "achieved / bound"]
    assert [r[0] for r in amdahl[1:]] == ["576", "9"] and amdahl[1][4:] == ["1.00x", "1.00x", "100%"]


def test_amdahl_bound_uses_the_runs_stage_times():
    from m3cli.bench.report import format_amdahl
    from m3cli.bench.throughput import ScaleRun, ThroughputRow

    sweep = [ScaleRun(576, ThroughputRow("a", 10, 10.0), encode_ms=100, lm_ms=900),
             ScaleRun(9, ThroughputRow("b", 10, 2.5), encode_ms=100, lm_ms=150)]
    rows = _table_rows(format_amdahl(sweep))
    assert rows[2] == ["9", "100", "150", "250", "4.00x", "4.00x", "100%"]  # (100+900)/(100+150) = 4
    sweep[1] = ScaleRun(9, ThroughputRow("b", 10, 5.0), encode_ms=100, lm_ms=150)
    assert _table_rows(format_amdahl(sweep))[2][4:] == ["2.00x", "4.00x", "50%"]
    assert "no Amdahl view" in format_amdahl(sweep[1:])


def test_bench_escalation_shape():
    res = CliRunner().invoke(cli, ["bench", "escalation", "--shape", "tiny", "--dtype", "float32", "-n", "2",
                                   "--ladder", "9,576", "--threshold", "0.9", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    rows = _table_rows(res.stdout)
    assert rows[0][:4] == ["items", "auto-scale ms/item", "fixed pass at final scale ms/item", "ratio"]
    assert rows[1][0] == "2" and rows[1][5] == "2.00"  # random weights: both rungs every time
    assert "Ladder 9,576, threshold 0.9" in res.stdout


def test_shape_gguf_pair_matches_m3_convert(tmp_path):
    """The streamed full LM carries the converted cut's key/values and, tensor for tensor, its weights."""
    import numpy as np

    from m3cli.bench.shape_gguf import pair_dir, shape_gguf_pair
    from m3cli.gguf.reader import open_reader

    shape = resolve_shape("tiny")
    lm, mmproj, notes = shape_gguf_pair(shape, tmp_path, "f16")
    assert lm.name == "shape-tiny-f16.gguf" and mmproj.is_file() and any("m3 convert" in n for n in notes)
    assert (mmproj.parent / "shape-tiny-mmproj-f16.rot180.gguf").is_file()
    full, cut = open_reader(lm), open_reader(pair_dir(shape, tmp_path) / "cut" / "shape-tiny-f16.gguf")
    assert full.fields["llama.block_count"].contents() == 2 and cut.fields["llama.block_count"].contents() == 1
    skip = {"llama.block_count", "general.name"}
    for key, fld in cut.fields.items():
        if not key.startswith("GGUF.") and key not in skip:
            assert full.fields[key].contents() == fld.contents(), key
    mine = {t.name: np.asarray(t.data) for t in full.tensors}
    shared = [t for t in cut.tensors]
    assert len(shared) == 2 + 9 + 1 and len(mine) == 2 + 2 * 9 + 1
    for t in shared:
        assert np.array_equal(mine[t.name], np.asarray(t.data)), t.name
    again = shape_gguf_pair(shape, tmp_path, "f16")
    assert again[0] == lm and again[2] == ["reused shape-tiny-f16.gguf and shape-tiny-mmproj-f16.gguf"]


def test_bench_gguf_shape_against_the_stock_handler(tmp_path):
    res = CliRunner().invoke(cli, ["bench", "gguf", "--shape", "tiny", "-n", "2", "--max-new-tokens", "2",
                                   "--threads", "1", "--workdir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "quantised to shape-tiny-q4_0.gguf with llama_model_quantize" in res.stdout
    rows = _table_rows(res.stdout)
    assert rows[0] == ["run", "items", "seconds", "items/s", "vs stock handler", "new tokens/answer", "ms/item p50",
                       "ms/item p90", "spread"]
    labels = [r[0] for r in rows[1:]]
    assert labels[0].startswith("stock `Llava15ChatHandler`, 576 tokens") and "flash_attn=True" in labels[1]
    assert labels[2:] == ["m3 batch --backend llamacpp --tokens 576", "m3 batch --backend llamacpp --tokens 9"]
    assert rows[1][4] == "1.00x" and all(float(r[5]) >= 2.0 for r in rows[1:3])


def test_bench_profile_times_the_decoder_layers():
    res = CliRunner().invoke(cli, ["bench", "profile", "--shape", "tiny", "--layers", "1", "--dtype", "float32",
                                   "--tokens", "9", "--batch", "1,2", "--attn", "sdpa,eager", "--repeat", "1"])
    assert res.exit_code == 0, res.output
    rows = _table_rows(res.stdout)
    matmul = [r for r in rows if len(r) == 4 and r[1] == "float32"]
    assert [int(r[0]) for r in matmul][:3] == [1, 9, 16]
    forwards = [r[0] for r in rows if r[0].startswith(("prefill", "decode"))]
    assert forwards == [f"{kind} 9 tokens, batch {b}, {a}" if kind == "prefill" else
                        f"decode step after 9, batch {b}, {a}"
                        for a in ("sdpa", "eager") for b in (1, 2) for kind in ("prefill", "decode")]
    layer_rows = [r for r in rows if r[0].startswith("prefill 9 tokens, batch 2")]
    assert all(int(r[1]) == 2 * 50 for r in layer_rows)  # two items of the 50-row prompt in one forward
    res = CliRunner().invoke(cli, ["bench", "profile", "--shape", "tiny", "--attn", "flash"])
    assert res.exit_code == 2 and "use sdpa and/or eager" in res.output
