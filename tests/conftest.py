"""Shared fixtures: a tiny random LLaVA built from configs and loaded through the real code."""

from __future__ import annotations

import pytest

from m3cli.models.build import ModelSpec, make_tiny_model

# The slowest tests, marked ``slow`` so that ``python -m pytest -q -m "not slow"`` is a quick development subset;
# CI and the README's test command run everything. Chosen with ``pytest --durations=40`` on an idle 2-core machine:
# each takes over a second (Ray clusters, llama.cpp conversions, kill-and-resume loops, reference agreement, a
# server stopped with requests in flight), and without them the suite takes well under two minutes there. A file
# name alone marks the whole file.
SLOW_TESTS: dict[str, frozenset[str] | None] = {
    "test_ray_engine.py": None,
    "test_real_gguf.py": None,
    "test_next_gguf.py": None,
    "test_batch_multi.py": frozenset({"test_ray_engine_gives_the_local_rows_for_several_questions_and_collages"}),
    "test_reliability_output.py": frozenset({
        "test_random_kills_then_resume_equal_a_straight_run", "test_output_io_errors_are_one_line",
        "test_confidence_digits_do_not_depend_on_batch_composition", "test_second_writer_on_one_output_exits_2",
        "test_non_utf8_file_names_written_escaped_everywhere_and_resumable",
        "test_interrupt_with_error_rows_pending_keeps_input_order",
        "test_random_kills_then_resume_eval_samples_equal_a_straight_run",
        "test_random_kills_with_inserted_removed_and_reordered_stdin_rows_answer_each_once"}),
    "test_reliability_writers.py": frozenset({
        "test_readme_shard_one_liner_works_on_a_small_input",
        "test_17_samples_on_a_full_disk_is_one_line_and_keeps_what_is_done"}),
    "test_reliability_inputs.py": frozenset({"test_13_a_named_fifo_never_blocks"}),
    "test_real_layouts.py": frozenset({
        "test_llamacpp_pair", "test_hf_reference_is_stock_generate_at_576",
        "test_reference_answers_depend_on_padding_and_scale", "test_reference_equals_stock_llava_on_square_image",
        "test_bpe_layout"}),
    "test_real_torch.py": frozenset({
        "test_llava_hf_equals_its_own_recipe_at_every_scale",
        "test_converted_directory_gives_plain_transformers_the_original_recipe",
        "test_original_checkpoint_converts_once_and_equals_the_original_recipe"}),
    "test_readme_commands.py": frozenset({"test_readme_m3_commands_run"}),
    "test_serve_cli.py": frozenset({
        "test_openai_batch_round_trip_killed_and_resumed", "test_sigterm_finishes_requests_in_flight_and_exits_0"}),
    "test_serve.py": frozenset({"test_hostile_requests_are_4xx_json_and_the_server_keeps_serving"}),
    "test_pixels_backends.py": frozenset({
        "test_the_tower_gets_the_recipes_pixels_for_every_image_kind",
        "test_prefix_after_special_can_be_stated_for_a_pair_that_does_not_record_it"}),
    "test_pixels.py": frozenset({"test_large_images_are_not_resized_before_the_recipe"}),
    "test_generation_counts.py": frozenset({"test_counts_finish_and_stop"}),
    "test_eval_formats.py": frozenset({"test_one_encode_per_image_across_rotations_and_scales"}),
}


def pytest_collection_modifyitems(config, items):
    """Mark the tests of SLOW_TESTS ``slow`` (the marker is registered in pyproject.toml)."""
    for item in items:
        names = SLOW_TESTS.get(item.path.name, frozenset())
        if names is None or getattr(item, "originalname", item.name) in names:
            item.add_marker(pytest.mark.slow)


TINY_WORDS = (
    "what colour is the background red green blue yellow how many shapes are there one two three "
    "circle square yes no letter written"
).split()

TINY_SPEC = ModelSpec(
    vision_hidden=32, vision_layers=2, vision_heads=2,
    text_hidden=64, text_layers=2, text_heads=2, text_kv_heads=2, text_intermediate=128,
    init_std=0.3,
)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never write into the user's ~/.cache (corrected mmproj copies go here instead)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("M3_CACHE_DIR", str(tmp_path_factory.mktemp("m3-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved random LLaVA with a 24x24 grid (48x48 images, patch 2)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llava"), TINY_WORDS, TINY_SPEC, seed=0)


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    from m3cli.backends.torch import TorchBackend

    return TorchBackend(str(tiny_model_dir), device="cpu")


@pytest.fixture
def scene_png(tmp_path):
    """A small RGB PNG with some structure."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (48, 48), (90, 90, 90))
    draw = ImageDraw.Draw(img)
    draw.ellipse((4, 4, 20, 20), fill=(220, 30, 30))
    draw.rectangle((28, 26, 42, 40), fill=(30, 40, 220))
    path = tmp_path / "scene.png"
    img.save(path)
    return path


@pytest.fixture(scope="session")
def llamacpp(tmp_path_factory):
    """llama.cpp's converter scripts (from the llama-cpp-python sdist the README's test command fetches); the
    real-layout GGUF tests fail, saying how to get them, when they are missing."""
    import gguf_setup as gs

    try:
        return gs.require_llamacpp(tmp_path_factory.mktemp("llamacpp-src"))
    except gs.LlamaCppSourcesMissing as exc:
        pytest.fail(str(exc), pytrace=False)
