"""The scale policy: a model's tuned policy is the default, --measure and --on-miss reach every answering path,
and rows say whether the threshold was met."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from m3cli.answering.core import Query, answer_queries, make_policy, policy_from_spec
from m3cli.backends.base import Encoded, Generation
from m3cli.cli import cli
from m3cli.matryoshka.policy import FALLBACK_POLICY, Escalate, Fixed, PolicySpec, Rung
from m3cli.output import ROW_KEYS

TUNED = {"tokens": 36, "auto_scale": True, "threshold": 0.25, "measure": "mean"}


class Scripted:
    """Per-question token probabilities per scale: the answer is one word per probability."""

    name, model_id, grid_side, scales = "scripted", "scripted", 24, [576, 144, 36, 9, 1]

    def __init__(self, script):
        self.script = script  # question -> {scale: [token probabilities]}
        self.requests = []

    def encode(self, images):
        return [Encoded(grid=None, side=24, encode_ms=1.0) for _ in images]

    def answer(self, requests):
        self.requests += requests
        out = []
        for r in requests:
            probs = self.script[r.question][r.scale]
            out.append(Generation(" ".join(f"w{k}" for k in range(len(probs))), list(range(len(probs))),
                                  [math.log(p) for p in probs], 2.0, 3.0))
        return out


def _ask(backend, question, policy):
    return answer_queries(backend, [Query(Encoded(None, 24, 1.0), question, policy)])[0]


# -- the spec: what a user states over what a model is tuned for --------------------------------------------------
def test_unstated_choice_comes_whole_from_the_model_and_knobs_one_by_one():
    model = PolicySpec.from_mapping(TUNED)
    assert PolicySpec().over(model) == PolicySpec(36, True, 0.25, "mean", None, "last")
    assert PolicySpec(tokens=9).over(model) == PolicySpec(9, False, 0.25, "mean", None, "last")  # a fixed 9
    assert PolicySpec(auto_scale=True).over(model).tokens is None  # --auto-scale alone: the whole ladder
    assert PolicySpec(auto_scale=True).over(model).threshold == 0.25  # ... at the model's threshold
    assert PolicySpec(threshold=0.9).over(model) == PolicySpec(36, True, 0.9, "mean", None, "last")
    assert PolicySpec().over(None) == FALLBACK_POLICY  # no tuned policy: the full grid, fixed
    assert FALLBACK_POLICY.tokens is None and not FALLBACK_POLICY.auto_scale


def test_spec_flags_state_it_on_the_command_line():
    assert PolicySpec.from_mapping(TUNED).flags() == "--tokens 36 --auto-scale --threshold 0.25 --measure mean"
    assert PolicySpec(tokens=9).flags() == "--tokens 9"
    assert PolicySpec().flags() == "the full grid"


@pytest.mark.parametrize("bad, needle", [
    ({"threshold": 2}, "threshold"), ({"measure": "median"}, "measure"), ({"tokens": 0}, "budget"),
    ({"auto_scale": "yes"}, "auto_scale"), ({"on_miss": "first"}, "on_miss"), ({"scale": 9}, "unknown key"),
])
def test_a_malformed_policy_mapping_is_refused_by_name(bad, needle):
    with pytest.raises(ValueError, match=needle):
        PolicySpec.from_mapping(bad, "registry: m: policy")


def test_policy_from_spec_builds_the_tuned_policy():
    policy = policy_from_spec(24, PolicySpec(), default=PolicySpec.from_mapping(TUNED))
    assert policy == Escalate((1, 9, 36), 0.25, "mean", "last")
    assert policy_from_spec(24, PolicySpec(tokens=100)) == Fixed(36)


# -- on a miss: the last rung or the most confident one; threshold_met says which ---------------------------------
SCRIPT = {"hard": {1: [0.6], 9: [0.3], 36: [0.2], 144: [0.4], 576: [0.1]},
          "easy": {1: [0.2], 9: [0.95], 36: [0.99], 144: [0.99], 576: [0.99]}}


def test_a_miss_returns_the_last_rung_by_default_and_says_so():
    res = _ask(Scripted(SCRIPT), "hard", Escalate((1, 9, 36, 144, 576), 0.9))
    assert res.tokens == 576 and res.confidence == pytest.approx(0.1)
    assert res.threshold_met is False and res.to_dict()["threshold_met"] is False


def test_on_miss_best_returns_the_most_confident_rung_decoded_in_full():
    backend = Scripted(SCRIPT)
    res = _ask(backend, "hard", Escalate((1, 9, 36, 144, 576), 0.9, on_miss="best"))
    assert res.tokens == 1 and res.confidence == pytest.approx(0.6) and res.threshold_met is False
    assert len(res.scales_tried) == 5
    assert all(r.stop_below is None for r in backend.requests)  # no rung may stop early: any can be returned


def test_threshold_met_is_true_when_reached_and_none_for_a_fixed_scale():
    backend = Scripted(SCRIPT)
    assert _ask(backend, "easy", Escalate((1, 9, 36), 0.9, on_miss="best")).threshold_met is True
    fixed = _ask(backend, "easy", Fixed(9))
    assert fixed.threshold_met is None and fixed.to_dict()["threshold_met"] is None


def test_best_breaks_ties_towards_the_larger_scale():
    policy = Escalate((1, 9, 36), 0.9, on_miss="best")
    tried = [Rung(1, "a", 0.5), Rung(9, "b", 0.5), Rung(36, "c", 0.4)]
    assert policy.final(tried).scale == 9


# -- --measure is part of the policy ------------------------------------------------------------------------------
def test_the_policys_measure_decides_confidence_and_escalation():
    script = {"q": {1: [0.9, 0.5], 9: [0.9, 0.9], 36: [0.99]}}  # sequence 0.45 at 1, mean 0.67
    seq = _ask(Scripted(script), "q", make_policy(24, 36, True, 0.6))
    mean = _ask(Scripted(script), "q", make_policy(24, 36, True, 0.6, measure="mean"))
    assert [r.scale for r in seq.scales_tried] == [1, 9] and seq.confidence == pytest.approx(0.81)
    assert [r.scale for r in mean.scales_tried] == [1] and mean.confidence == pytest.approx(math.sqrt(0.45))
    fixed = _ask(Scripted(script), "q", make_policy(24, 1, measure="min"))
    assert fixed.confidence == pytest.approx(0.5)


def test_an_explicit_measure_argument_still_overrides_the_policys():
    script = {"q": {1: [0.9, 0.5]}}
    res = answer_queries(Scripted(script), [Query(Encoded(None, 24, 1.0), "q", Fixed(1, "mean"))], "first")[0]
    assert res.confidence == pytest.approx(0.9)


# -- through the CLI: the model's policy from the registry ---------------------------------------------------------
@pytest.fixture
def tuned_registry(tmp_path, tiny_model_dir, monkeypatch):
    """A models directory whose registry has the tiny model with a tuned policy (and one without)."""
    registry = tmp_path / "models"
    registry.mkdir()
    (registry / "registry.yaml").write_text(
        "models:\n"
        f"  tuned:\n    path: {tiny_model_dir}\n    format: hf\n    policy: {json.dumps(TUNED)}\n"
        f"  plain:\n    hub: someone/plain\n    format: hf\n")
    monkeypatch.setenv("M3CLI_MODELS_DIR", str(registry))
    return registry


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_ask_without_flags_uses_the_models_policy_and_records_it(tuned_registry, scene_png):
    res = _run("ask", scene_png, "what colour is the background?", "--model", "tuned", "--json",
               "--max-new-tokens", 2)
    assert res.exit_code in (0, 1), res.output
    row = json.loads(res.stdout)
    assert list(row) == list(ROW_KEYS)
    assert [r["tokens"] for r in row["scales_tried"]][0] == 1 and row["tokens"] <= 36
    assert row["run"]["tokens"] == 36 and row["run"]["auto_scale"] is True
    assert row["run"]["threshold"] == 0.25 and row["run"]["measure"] == "mean"
    assert isinstance(row["threshold_met"], bool)


def test_a_path_to_a_registered_model_gets_its_policy_too(tuned_registry, tiny_model_dir, scene_png):
    res = _run("ask", scene_png, "q", "--model", tiny_model_dir, "--json", "--max-new-tokens", 2)
    assert json.loads(res.stdout)["run"]["threshold"] == 0.25


def test_tokens_alone_replaces_the_models_policy(tuned_registry, scene_png):
    row = json.loads(_run("ask", scene_png, "q", "--model", "tuned", "--tokens", 9, "--json",
                          "--max-new-tokens", 2).stdout)
    assert [r["tokens"] for r in row["scales_tried"]] == [9] and row["threshold_met"] is None
    assert row["run"]["tokens"] == 9 and "auto_scale" not in row["run"]


def test_threshold_alone_adjusts_an_escalating_model_policy(tuned_registry, scene_png):
    row = json.loads(_run("ask", scene_png, "q", "--model", "tuned", "--threshold", 1.0, "--json",
                          "--max-new-tokens", 2).stdout)
    assert [r["tokens"] for r in row["scales_tried"]] == [1, 9, 36]
    assert row["threshold_met"] is False and row["run"]["threshold"] == 1.0


def test_threshold_without_an_escalating_policy_is_a_usage_error(tuned_registry, tiny_model_dir, scene_png):
    res = CliRunner().invoke(cli, ["ask", str(scene_png), "q", "--model", "tuned", "--tokens", "9",
                                   "--on-miss", "best"])
    assert res.exit_code == 2 and "need --auto-scale" in res.stderr


def test_batch_rows_carry_the_policy_and_a_jsonl_budget_replaces_it(tuned_registry, scene_png, tmp_path):
    stdin = "\n".join([json.dumps({"image": str(scene_png), "id": "own", "tokens": 9}), str(scene_png)]) + "\n"
    res = CliRunner().invoke(cli, ["batch", "-", "-q", "q", "--model", "tuned", "--max-new-tokens", "2",
                                   "--measure", "min", "--on-miss", "best"], input=stdin)
    assert res.exit_code == 0, res.output
    own, run_default = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["tokens"] for r in own["scales_tried"]] == [9] and own["threshold_met"] is None
    assert run_default["scales_tried"][0]["tokens"] == 1 and isinstance(run_default["threshold_met"], bool)
    assert run_default["run"] == own["run"]
    assert run_default["run"]["measure"] == "min" and run_default["run"]["on_miss"] == "best"
    assert run_default["timings"]["batch_size"] == 2


@pytest.mark.parametrize("pixels", [[], ["--upright", "--alpha-background", "white"]])
def test_ask_json_is_the_batch_row_of_the_same_item(tuned_registry, scene_png, pixels):
    args = ["--model", "tuned", "--tokens", "36", "--max-new-tokens", "2", *pixels]
    asked = json.loads(_run("ask", scene_png, "what colour is the background?", *args, "--json").stdout)
    res = _run("batch", scene_png, "-q", "what colour is the background?", *args)
    batched = json.loads(res.stdout)
    assert list(asked) == list(batched) == list(ROW_KEYS)
    strip = ("timings",)
    assert {k: v for k, v in asked.items() if k not in strip} == {k: v for k, v in batched.items() if k not in strip}
    assert asked["timings"]["batch_size"] == 1
    assert ("alpha_background" in asked["run"]) == bool(pixels)  # the image options are part of the record


def test_ask_json_prints_an_item_error_as_a_row(tuned_registry, scene_png):
    res = _run("ask", scene_png, "x" * 30, "--model", "tuned", "--tokens", 9, "--json", "--max-question-chars", 40,
               "--max-new-tokens", 4096)
    assert res.exit_code == 1
    row = json.loads(res.stdout)
    assert row["error"] and row["answer"] is None and list(row) == list(ROW_KEYS)
    assert res.stderr.strip().splitlines() == [f"m3: error: {row['error']}"]


def test_help_names_the_default_models_policy():
    res = _run("ask", "--help")
    assert "m3-shapes: --tokens 144 --auto-scale --threshold 0.7" in " ".join(res.stdout.split())
    assert "(m3-shapes: 0.7); 0.5 for a model without one" in " ".join(res.stdout.split())


def test_shipped_registry_policy_is_valid():
    from m3cli.answering.defaults import model_policy

    spec = model_policy("m3-shapes")
    assert spec == PolicySpec(144, True, 0.7, "sequence", None, None)


# -- the server's core and OpenAI Batch files: the same default policy as m3 ask and m3 batch --------------------
def test_answer_asks_runs_each_policy_under_its_own_measure():
    from m3cli.answering.core import Ask, answer_asks

    script = {"q": {1: [0.9, 0.5], 9: [0.9, 0.9], 36: [0.99]}}
    seq, mean, fixed = answer_asks(Scripted(script), [Ask(None, "q", make_policy(24, 36, True, 0.6)),
                                                      Ask(None, "q", make_policy(24, 36, True, 0.6, measure="mean")),
                                                      Ask(None, "q", make_policy(24, 1, measure="min"))])
    assert [r.scale for r in seq.scales_tried] == [1, 9] and seq.threshold_met is True
    assert [r.scale for r in mean.scales_tried] == [1] and mean.confidence == pytest.approx(math.sqrt(0.45))
    assert fixed.confidence == pytest.approx(0.5) and fixed.threshold_met is None


def test_the_returned_rungs_finish_reason_and_visual_tokens():
    class Cut(Scripted):
        def answer(self, requests):
            out = super().answer(requests)
            for r, gen in zip(requests, out, strict=True):  # the 1-token rung ran out of length, the others ended
                gen.finish_reason = "length" if r.scale == 1 else "stop"
            return out

    res = _ask(Cut(SCRIPT), "hard", Escalate((1, 9, 36, 144, 576), 0.9, on_miss="best"))
    assert res.tokens == 1 and res.finish_reason == "length" and res.visual_tokens == 1


def test_serve_help_names_the_default_models_policy():
    text = " ".join(_run("serve", "--help").stdout.split())
    assert "m3-shapes: --tokens 144 --auto-scale --threshold 0.7" in text and "--measure" in text


def test_openai_batch_requests_without_a_budget_get_the_models_policy(tuned_registry, scene_png, tmp_path):
    import base64

    url = "data:image/png;base64," + base64.b64encode(scene_png.read_bytes()).decode()

    def line(custom_id, m3=None, detail=None):
        image = {"url": url} | ({"detail": detail} if detail else {})
        body = {"model": "tuned", "max_tokens": 2, "messages": [{"role": "user", "content": [  # --model's name
            {"type": "text", "text": "q"}, {"type": "image_url", "image_url": image}]}]}
        if m3 is not None:
            body["m3"] = m3
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})

    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join([line("plain"), line("low", detail="low"), line("auto", {"auto_scale": True}),
                                   line("knobs", {"auto_scale": True, "measure": "min", "on_miss": "best"})]) + "\n")
    res = CliRunner().invoke(cli, ["batch", str(requests), "--input-format", "openai", "--model", "tuned"])
    assert res.exit_code == 0, res.output
    rows = {r["id"]: r for r in map(json.loads, res.stdout.splitlines())}
    assert rows["plain"]["scales_tried"][0]["tokens"] == 1 and rows["plain"]["tokens"] <= 36  # the tuned ladder
    assert isinstance(rows["plain"]["threshold_met"], bool)
    assert rows["plain"]["run"]["threshold"] == 0.25 and rows["plain"]["run"]["measure"] == "mean"
    assert [r["tokens"] for r in rows["low"]["scales_tried"]] == [9] and rows["low"]["threshold_met"] is None
    assert rows["auto"]["scales_tried"][0]["tokens"] == 1 and isinstance(rows["auto"]["threshold_met"], bool)
    assert len(rows["knobs"]["scales_tried"]) == 5 or rows["knobs"]["threshold_met"]  # best: decoded in full
