"""orion merge: real mergekit merges of tiny models, checked against arithmetic done here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orion_cli.modeldir import inspect_model_dir, weights_digest
from orion_cli.registry import Registry

from conftest import REPO_ROOT

@pytest.fixture(scope="session")
def variants(tmp_path_factory) -> dict[str, Path]:
    """Three tiny Llamas with different weights, and a Mistral of the same shapes."""
    from tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("merge-variants")
    built = {f"llama{seed}": build_tiny_model("llama", root / f"llama{seed}", seed=seed) for seed in (1, 2, 3)}
    built["mistral"] = build_tiny_model("mistral", root / "mistral", seed=4)
    return built


def load_weights(directory: Path) -> dict:
    from orion_cli.checkpoint import CheckpointReader

    with CheckpointReader(directory) as reader:
        return {name: tensor.clone() for name, tensor in reader.iter_tensors()}


def assert_nothing_written(output: Path) -> None:
    assert not output.exists()
    assert not [p.name for p in output.parent.iterdir() if p.name.startswith(".orion-tmp-")]


def test_linear_is_the_normalized_weighted_average(orion, variants):
    import torch

    a, b, c = (variants[f"llama{s}"] for s in (1, 2, 3))
    result = orion("merge", "--models", a, b, c, "--ratios", 2, 1, 1, "--output", "out", "--json")
    assert result.exit_code == 0, result.stderr
    merged, wa, wb, wc = (load_weights(d) for d in (Path("out"), a, b, c))
    assert set(merged) == set(wa)
    for name, tensor in merged.items():
        expected = 0.5 * wa[name].double() + 0.25 * wb[name].double() + 0.25 * wc[name].double()
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-6, msg=name)

    summary = result.json()
    assert summary["parameters"]["weights"] == [0.5, 0.25, 0.25]
    metadata = json.loads(Path("out/metadata.json").read_text())
    provenance = metadata["provenance"]
    assert provenance["operation"] == "merge"
    assert provenance["parameters"]["mergekit_version"] == "0.1.4"
    assert [s["sha256"] for s in provenance["sources"]] == [weights_digest(inspect_model_dir(d))[0] for d in (a, b, c)]
    assert (Path("out/tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes())
    assert json.loads(Path("out/config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert yaml.safe_load(Path("out/mergekit_config.yml").read_text()) == provenance["parameters"]["mergekit_config"]


@pytest.mark.parametrize("ratios, endpoint", [((1, 0), "llama1"), ((0, 1), "llama2")])
def test_slerp_at_either_end_returns_that_model(orion, variants, ratios, endpoint):
    import torch

    result = orion("merge", "--models", variants["llama1"], variants["llama2"], "--ratios", *ratios,
                   "--method", "slerp", "--output", "out")
    assert result.exit_code == 0, result.stderr
    merged, expected = load_weights(Path("out")), load_weights(variants[endpoint])
    assert set(merged) == set(expected)
    for name in expected:
        assert torch.equal(merged[name], expected[name]), name


def test_slerp_follows_the_great_circle(orion, variants):
    """Ratios 0.7 0.3 put t at 0.3: every tensor is the spherical interpolation computed here."""
    import math

    import torch

    result = orion("merge", "--models", variants["llama1"], variants["llama2"], "--ratios", 0.7, 0.3,
                   "--method", "slerp", "-o", "mid")
    assert result.exit_code == 0, result.stderr
    assert json.loads(Path("mid/metadata.json").read_text())["provenance"]["parameters"]["t"] == 0.3
    mid, wa, wb = load_weights(Path("mid")), load_weights(variants["llama1"]), load_weights(variants["llama2"])
    t = 0.3
    for name in wa:
        a, b = wa[name].double(), wb[name].double()
        cos = float((a / a.norm() * b / b.norm()).sum())
        if abs(cos) > 0.9995:  # (nearly) parallel, e.g. norm weights that are all ones: a straight line
            expected = (1 - t) * a + t * b
        else:
            theta = math.acos(cos)
            expected = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
        torch.testing.assert_close(mid[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    name = "model.layers.0.mlp.up_proj.weight"  # and not a straight line: the norm does not sag
    assert mid[name].norm() > ((1 - t) * wa[name] + t * wb[name]).norm() * 1.05


def test_dare_drop_is_reproducible_with_its_seed(orion, variants):
    import torch

    models = [variants["llama1"], variants["llama2"], variants["llama3"]]
    for out, seed in (("s5a", 5), ("s5b", 5), ("s6", 6)):
        result = orion("merge", "--models", *models, "--ratios", 0, 0.5, 0.5, "--method", "dare",
                       "--density", 0.3, "--seed", seed, "-o", out)
        assert result.exit_code == 0, result.stderr
    first, again, other = (load_weights(Path(d)) for d in ("s5a", "s5b", "s6"))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)
    parameters = json.loads(Path("s5a/metadata.json").read_text())["provenance"]["parameters"]
    assert parameters["mergekit_method"] == "dare_ties"
    assert parameters["seed"] == 5 and parameters["density"] == 0.3


def test_merged_model_loads_in_transformers_and_generates(orion, variants):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orion_cli.weights import read_safetensors_header

    result = orion("merge", "--models", variants["llama1"], variants["llama2"], "--method", "ties",
                   "--dtype", "bfloat16", "-o", "bf16")
    assert result.exit_code == 0, result.stderr
    tensors, _ = read_safetensors_header(Path("bf16/model.safetensors"))
    assert {info.dtype for info in tensors.values()} == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained("bf16", dtype="auto")
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained("bf16")
    inputs = tokenizer("def merge(a, b):", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 8
    assert isinstance(tokenizer.decode(generated[0]), str)


def test_config_yaml_round_trips(orion, variants):
    """The mergekit_config.yml an output carries reproduces it through --config, bit for bit."""
    models = [variants["llama1"], variants["llama2"], variants["llama3"]]
    first = orion("merge", "--models", *models, "--ratios", 0, 0.6, 0.4, "--method", "dare_linear",
                  "--seed", 3, "-o", "first")
    assert first.exit_code == 0, first.stderr
    again = orion("merge", "--config", "first/mergekit_config.yml", "--seed", 3, "-o", "again", "--json")
    assert again.exit_code == 0, again.stderr
    assert Path("again/model.safetensors").read_bytes() == Path("first/model.safetensors").read_bytes()
    assert Path("again/mergekit_config.yml").read_text() == Path("first/mergekit_config.yml").read_text()
    assert again.json()["parameters"]["config_file"] == str(Path("first/mergekit_config.yml").absolute())


def test_config_takes_relative_paths_and_registry_keys(orion, variants, tmp_path):
    import torch

    Path("models").mkdir()
    (Path("models") / "a").symlink_to(variants["llama1"])
    assert orion("register", variants["llama2"], "--id", "second").exit_code == 0
    Path("merge.yml").write_text(
        "merge_method: linear\n"
        "models:\n"
        "  - model: models/a\n"
        "    parameters: {weight: 0.25}\n"
        "  - model: second\n"
        "    parameters: {weight: 0.75}\n"
        "dtype: float32\n"
    )
    result = orion("merge", "--config", "merge.yml", "-o", "out", "--register", "blend", "--json")
    assert result.exit_code == 0, result.stderr
    recorded = yaml.safe_load(Path("out/mergekit_config.yml").read_text())
    assert [m["model"] for m in recorded["models"]] == [str(Path("models/a").absolute()), str(variants["llama2"])]
    merged, wa, wb = load_weights(Path("out")), load_weights(variants["llama1"]), load_weights(variants["llama2"])
    for name in merged:
        torch.testing.assert_close(merged[name], 0.25 * wa[name] + 0.75 * wb[name], rtol=1e-5, atol=1e-6)
    entry = Registry("models.json").get("blend")
    assert entry["provenance"]["operation"] == "merge"
    assert [s.get("key") for s in entry["provenance"]["sources"]] == [None, "second"]


def test_registry_keys_and_register(orion, variants):
    for key, model in (("one", variants["llama1"]), ("two", variants["llama2"])):
        assert orion("register", model, "--id", key).exit_code == 0
    result = orion("merge", "--models", "one", "two", "--ratios", 0.5, 0.5, "-o", "blend", "--register", "blend", "--json")
    assert result.exit_code == 0, result.stderr
    entry = Registry("models.json").get("blend")
    assert entry["architecture"] == "LlamaForCausalLM"
    assert entry["provenance"]["parameters"]["models"] == ["one", "two"]
    assert [s["key"] for s in entry["provenance"]["sources"]] == ["one", "two"]


def test_a_manifest_sharded_input_is_merged_through_an_index(orion, variants, tmp_path):
    """A layout mergekit cannot index by itself (shard files + shard_manifest.json only)."""
    import torch
    from safetensors.torch import save_file

    weights = load_weights(variants["llama1"])
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(weights)
    halves = {"shard_00.safetensors": names[: len(names) // 2], "shard_01.safetensors": names[len(names) // 2:]}
    for file, members in halves.items():
        save_file({n: weights[n] for n in members}, str(sharded / file))
    (sharded / "shard_manifest.json").write_text(json.dumps({"shards": [{"file": f} for f in halves]}))
    for support in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (sharded / support).write_bytes((variants["llama1"] / support).read_bytes())

    result = orion("merge", "--models", sharded, variants["llama2"], "--ratios", 1, 0, "-o", "out")
    assert result.exit_code == 0, result.stderr
    merged = load_weights(Path("out"))
    assert all(torch.equal(merged[n], weights[n]) for n in weights)
    recorded = Path("out/mergekit_config.yml").read_text()
    assert str(sharded) in recorded and "orion-merge-view" not in recorded


def test_allow_crimes_merges_different_architectures(orion, variants):
    plain = orion("merge", "--models", variants["llama1"], variants["mistral"], "-o", "crime")
    assert plain.exit_code == 1
    assert "architecture MistralForCausalLM differs from LlamaForCausalLM" in plain.stderr
    assert "--allow-crimes" in plain.stderr
    assert_nothing_written(Path("crime").absolute())

    forced = orion("merge", "--models", variants["llama1"], variants["mistral"], "--allow-crimes", "-o", "crime")
    assert forced.exit_code == 0, forced.stderr
    assert json.loads(Path("crime/metadata.json").read_text())["provenance"]["parameters"]["allow_crimes"] is True


@pytest.fixture(scope="session")
def odd_shape(variants, tmp_path_factory) -> Path:
    """llama1 with exactly one tensor of another shape."""
    from safetensors.torch import save_file

    target = tmp_path_factory.mktemp("odd-shape") / "odd"
    target.mkdir()
    weights = load_weights(variants["llama1"])
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:96].clone()
    save_file(weights, str(target / "model.safetensors"))
    (target / "config.json").write_bytes((variants["llama1"] / "config.json").read_bytes())
    return target


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(orion, variants, odd_shape):
    result = orion("merge", "--models", variants["llama2"], odd_shape, "-o", "out")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert f"--models {odd_shape}: tensor model.layers.1.mlp.up_proj.weight has shape (96, 64) but (128, 64)" in lines[0]
    assert_nothing_written(Path("out").absolute())

    forced = orion("merge", "--models", variants["llama2"], odd_shape, "--allow-crimes", "-o", "out")
    assert forced.exit_code == 1
    assert "mergekit could not merge these models" in forced.stderr
    assert "model.layers.1.mlp.up_proj.weight" in forced.stderr
    assert_nothing_written(Path("out").absolute())


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--ratios", 0.5, 0.3, 0.2], 2, "--ratios: 3 ratios for 2 models"),
        (["--ratios", 0.5, -0.5], 2, "--ratios -0.5: ratios are weights and must be finite and >= 0"),
        (["--ratios", 0, 0], 2, "--ratios: all ratios are 0"),
        (["--ratios", 1, 0, "--method", "ties"], 2, "every model but the base has ratio 0"),
        (["--base", "{llama3}"], 2, "--base applies to ties, dare and dare_linear, not to --method linear"),
        (["--method", "slerp", "--models", "{llama3}"], 2, "exactly two models; --models names 3"),
        (["--method", "average"], 2, "--method average: choose from linear, slerp, ties, dare, dare_linear"),
        (["--density", 0.5], 2, "--density applies to ties, dare and dare_linear, not to --method linear"),
        (["--method", "ties", "--density", 1.5], 2, "--density 1.5: must be a fraction in (0, 1]"),
        (["--dtype", "int8"], 2, "--dtype int8: choose from float32, float16, bfloat16"),
        (["--models", "no/such/dir"], 1, "--models no/such/dir: neither a directory nor a key in registry"),
        (["--config", "merge.yml"], 2, "--config merge.yml holds the whole merge; drop --models"),
    ],
)
def test_bad_input_fails_in_one_line_and_writes_nothing(orion, variants, args, code, message):
    args = [str(a).format(**{k: str(v) for k, v in variants.items()}) for a in args]
    result = orion("merge", "--models", variants["llama1"], variants["llama2"], *args, "-o", "out")
    assert result.exit_code == code, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert_nothing_written(Path("out").absolute())


def test_existing_output_and_taken_key_are_refused_before_merging(orion, variants):
    Path("out").mkdir()
    (Path("out") / "keep.txt").write_text("mine")
    result = orion("merge", "--models", variants["llama1"], variants["llama2"], "-o", "out")
    assert result.exit_code == 1
    assert "--output" in result.stderr and "already exists; pass --force" in result.stderr
    assert [p.name for p in Path("out").iterdir()] == ["keep.txt"]

    assert orion("register", variants["llama1"], "--id", "taken").exit_code == 0
    result = orion("merge", "--models", variants["llama1"], variants["llama2"], "-o", "new", "--register", "taken")
    assert result.exit_code == 1 and "key 'taken' already exists" in result.stderr
    assert_nothing_written(Path("new").absolute())

    replaced = orion("merge", "--models", variants["llama1"], variants["llama2"], "-o", "out", "--force")
    assert replaced.exit_code == 0, replaced.stderr
    assert not Path("out/keep.txt").exists() and Path("out/model.safetensors").is_file()


@pytest.mark.parametrize(
    "text, message",
    [
        ("merge_method: linear\nmodels: [{model: ./nowhere}]\n", "models[0].model ./nowhere: neither a directory nor a key"),
        ("merge_method: averaging\nmodels: [{model: M1}, {model: M2}]\n", "key 'merge_method': unknown method 'averaging'"),
        ("merge_method: linear\nmodels: [{model: M1, parameters: {weight: [}\n", "invalid YAML"),
        ("merge_method: linear\nmodels: [{model: M1+lora}]\n", "LoRA adapters are not merged by orion"),
        ("models: [{model: M1}, {model: M2}]\n", "merge config merge.yml: key 'merge_method': Field required"),
    ],
)
def test_bad_merge_yaml_is_reported_with_the_key_at_fault(orion, variants, text, message):
    Path("merge.yml").write_text(text.replace("M1", str(variants["llama1"])).replace("M2", str(variants["llama2"])))
    result = orion("merge", "--config", "merge.yml", "-o", "out")
    assert result.exit_code in (1, 2), result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert_nothing_written(Path("out").absolute())


def test_library_call_leaves_the_callers_random_state_alone(variants, tmp_path):
    import torch

    from orion_cli.merge import merge_models

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    merge_models([variants["llama1"], variants["llama2"]], tmp_path / "lib", method="dare", seed=9)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "args, parsed",
    [
        (["--models", "a", "b", "c", "-o", "x"], {"models": ["a", "b", "c"], "output": Path("x")}),
        (["--models", "a", "--ratios", "0.5", "-0.5", "--json"], {"ratios": [0.5, -0.5], "json_output": True}),
        (["--models=a", "--ratios", "1e-3"], {"models": ["a"], "ratios": [0.001]}),
        (["--models", "--json"], {"models": ["--json"]}),  # click's own rule: an option's first value is taken as is
        (["--models", "a", "--", "--models"], "unexpected extra argument(s) (--models)"),
    ],
)
def test_models_and_ratios_take_several_values(args, parsed):
    """Parsed by the real command: click's parser takes the values that follow, no argv is rewritten."""
    import typer

    from orion_cli.cli.app import app

    command = typer.main.get_command(app).get_command(None, "merge")
    if isinstance(parsed, str):
        with pytest.raises(Exception, match=re.escape(parsed)):
            command.make_context("merge", list(args))
        return
    params = command.make_context("merge", list(args)).params
    assert {key: params[key] for key in parsed} == parsed


# -- against the real mergekit-yaml, and offline -------------------------------

MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("method", ["ties", "dare", "dare_linear"])
def test_task_vector_merges_are_bitwise_what_mergekit_yaml_writes(orion, variants, method):
    models = [variants[f"llama{seed}"] for seed in (1, 2, 3)]
    result = orion("merge", "--models", *models, "--ratios", 0, 0.7, 0.5, "--method", method,
                   "--density", 0.4, "--seed", 11, "-o", "orion")
    assert result.exit_code == 0, result.stderr
    mergekit = subprocess.run(
        [str(MERGEKIT_YAML), "orion/mergekit_config.yml", "mergekit", "--random-seed", "11"],
        capture_output=True, text=True, timeout=600,
    )
    assert mergekit.returncode == 0, mergekit.stderr[-2000:]
    assert Path("orion/model.safetensors").read_bytes() == Path("mergekit/model.safetensors").read_bytes()
    assert json.loads(Path("orion/config.json").read_text()) == json.loads(Path("mergekit/config.json").read_text())


NETWORK_GUARD = """
import socket, sys

def refuse(*args, **kwargs):
    sys.stderr.write(f"NETWORK ATTEMPT {args!r}\\n")
    raise OSError("network use refused by the test")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.getaddrinfo = socket.create_connection = refuse
from orion_cli.cli.app import run
code = run(sys.argv[1:])
sys.stderr.write("ORION DONE\\n")
# the guard catches what it is there for: mergekit's card writer asking the hub about models/a
from mergekit.card import is_hf
try:
    is_hf("models/a")
except Exception:
    pass
sys.exit(code)
"""


@pytest.mark.multiprocess
def test_nothing_reaches_the_network_even_with_the_hub_switched_on(variants):
    """models/a has one slash and exists, so mergekit's card writer would ask the hub whether it is a repo."""
    Path("models").mkdir()
    (Path("models") / "a").symlink_to(variants["llama1"])
    (Path("models") / "b").symlink_to(variants["llama2"])
    Path("merge.yml").write_text("merge_method: ties\nbase_model: models/a\nmodels:\n  - model: models/a\n"
                                 "  - model: models/b\n    parameters: {weight: 1.0, density: 0.5}\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    guarded = subprocess.run([sys.executable, "-c", NETWORK_GUARD, "merge", "--config", "merge.yml", "-o", "out"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert guarded.returncode == 0, guarded.stderr[-2000:]
    during_merge, _, after = guarded.stderr.partition("ORION DONE")
    assert "NETWORK ATTEMPT" not in during_merge
    assert "NETWORK ATTEMPT" in after
    assert Path("out/README.md").is_file()  # the card was written, from absolute paths


SHIPPED_EXAMPLES = sorted((REPO_ROOT / "configs" / "merge").glob("*.yaml"))


@pytest.mark.parametrize("example", SHIPPED_EXAMPLES, ids=lambda p: p.name)
def test_shipped_merge_examples_run(orion, variants, example):
    import torch

    Path("models").mkdir()
    for name, model in (("base", "llama1"), ("chat", "llama2"), ("code", "llama3")):
        (Path("models") / name).symlink_to(variants[model])
    result = orion("merge", "--config", example, "-o", "out")
    assert result.exit_code == 0, result.stderr
    if example.name == "slerp-gradient.yaml":  # t runs 0 -> 1 over the two layers for attention, 1 -> 0 for MLPs
        merged, chat, code = (load_weights(Path(d)) for d in ("out", "models/chat", "models/code"))
        for layer, (attention, mlp) in enumerate(((chat, code), (code, chat))):
            for name in (f"model.layers.{layer}.self_attn.q_proj.weight", f"model.layers.{layer}.mlp.up_proj.weight"):
                assert torch.equal(merged[name], (attention if "self_attn" in name else mlp)[name]), name


# -- every architecture's every tensor ---------------------------------------------------

from tiny_models import ARCHITECTURES  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_tensor_of_every_architecture_is_merged(orion, tiny_models, tmp_path, arch):
    """mergekit's descriptions miss OLMo2's q/k norms and Gemma's untied head; none may be dropped."""
    import torch

    from tiny_models import build_tiny_model

    first, second = tiny_models[arch], build_tiny_model(arch, tmp_path / "second", seed=1)
    result = orion("merge", "--models", first, second, "--output", "out")
    assert result.exit_code == 0, result.stderr
    merged, a, b = load_weights(Path("out")), load_weights(first), load_weights(second)
    assert set(merged) == set(a)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, (a[name] + b[name]) / 2, rtol=1e-6, atol=1e-6, msg=name)
    tie = lambda d: json.loads((Path(d) / "config.json").read_text()).get("tie_word_embeddings")  # noqa: E731
    assert tie("out") == tie(first)


@pytest.mark.slow
def test_a_merge_that_would_drop_tensors_fails_and_writes_nothing(orion, tiny_models, tmp_path, monkeypatch):
    """The check after the merge: with mergekit left to its own description of OLMo2, the q/k norms go missing."""
    import orion_cli.merge.execute

    from tiny_models import build_tiny_model

    monkeypatch.setattr(orion_cli.merge.execute, "uncovered_tensors", lambda *args: set())
    second = build_tiny_model("olmo2", tmp_path / "second", seed=1)
    result = orion("merge", "--models", tiny_models["olmo2"], second, "--output", "deep/er/out")
    assert result.exit_code == 1
    assert "lacks tensor model.layers.0.self_attn.q_norm.weight" in result.stderr, result.stderr
    assert not Path("deep").exists()
