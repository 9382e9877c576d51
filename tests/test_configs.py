"""Every shipped config loads strictly and lowers one train step on fake CPU devices shaped like its target mesh."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rstar_jax.config import Config, RunConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "base.yaml")

LOWER = """
import json, sys
import jax
from rstar_jax.config import load_config
from rstar_jax.train.loop import lower_step
from rstar_jax.train.model_source import arch_model_config
for path, kind in json.loads(sys.argv[1]):
    cfg = load_config([path])
    hlo = lower_step(cfg, kind, arch_model_config(cfg.model.arch)).as_text()
    print(path, kind, len(hlo), flush=True)
"""


def test_base_yaml_lists_exactly_the_defaults():
    assert load_config([str(REPO / "configs" / "base.yaml")]) == Config()


def test_unknown_keys_and_bad_values_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("include: [%s]\noptim: {learnin_rate: 1.0}\n" % (REPO / "configs" / "base.yaml"))
    with pytest.raises(RunConfigError, match=r"bad.yaml: unknown config key 'optim.learnin_rate'"):
        load_config([str(bad)])
    with pytest.raises(RunConfigError, match=r"data.batch_size: expected int"):
        load_config([str(CONFIGS[0]), "data.batch_size=eight"])
    cfg = load_config([str(CONFIGS[0]), "optim.learning_rate=3e-4", "mesh.fsdp=2"])
    assert cfg.optim.learning_rate == 3e-4 and cfg.mesh.fsdp == 2


def _devices(cfg: Config) -> int:
    return 8 if -1 in cfg.mesh.shape else math.prod(cfg.mesh.shape)


@pytest.mark.slow
def test_every_config_lowers_on_its_mesh_shape():
    groups: dict[int, list] = {}
    for path in CONFIGS:
        cfg = load_config([str(path)])
        assert cfg.model.arch.given, f"{path.name}: no model.arch"
        assert cfg.data.batch_size % cfg.data.grad_accum == 0
        kinds = ["sft", "ppm"] if path.name.startswith("smollm2") else ["sft"]
        groups.setdefault(_devices(cfg), []).extend([str(path), k] for k in kinds)
    for n, jobs in groups.items():
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(n), "PYTHONPATH": str(REPO)}
        r = subprocess.run([sys.executable, "-c", LOWER, json.dumps(jobs)], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(r.stdout.splitlines()) == len(jobs), r.stdout


# ---------------------------------------------------------------------------------------------
# Every command's config: flags are aliases of keys, YAML files and key=value overrides, strict, typed


def _command_config(argv):
    from rstar_jax.cli import build_parser, command_config

    args, extra = build_parser(argv).parse_known_args(argv)
    args.overrides = extra
    return command_config(args)


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "m", "--prompt", "p"],
    ["search", "--model", "m", "--problems", "p", "--method", "mcts", "--out", "o"],
    ["eval", "--model", "m", "--problems", "p", "--out", "o"],
    ["label", "mc", "--trees", "t", "--policy", "m", "--out", "o"],
    ["label", "consensus", "--mc", "m", "--judge", "j", "--out", "o"],
    ["processbench", "--reward-model", "r", "--data", "d", "--out", "o"],
])
def test_every_inference_command_has_a_mesh_and_a_dtype(argv):
    from rstar_jax.config import InferenceConfig

    cfg = _command_config([*argv, "mesh.data=2", "mesh.tensor=4", "dtype=bfloat16"])
    assert isinstance(cfg, InferenceConfig) and cfg.mesh.shape == (2, 1, 4) and cfg.dtype == "bfloat16"


def test_flags_config_files_and_overrides_set_the_same_keys(tmp_path):
    yaml_file = tmp_path / "search.yaml"
    yaml_file.write_text("model: m\nproblems: synth:levels=1,n=2,seed=0\nmethod: mcts\nmcts: {rollouts: 3, c: 1.5}\n")
    cfg = _command_config(["search", "--out", "o", "--candidates", "5", "--temperature", "0.5", str(yaml_file),
                           "mcts_star.alpha=0.25", "sandbox.timeout_s=2"])
    assert (cfg.mcts.rollouts, cfg.mcts.c, cfg.mcts.candidates, cfg.mcts.temperature) == (3, 1.5, 5, 0.5)
    assert cfg.mcts_star.branch == 5 and cfg.baseline.candidates == 5 and cfg.mcts_star.alpha == 0.25
    assert cfg.driver_config.mode == "terminal" and cfg.sandbox.timeout_s == 2.0
    # a flag wins over a config file; fields the command sets itself are not keys
    assert _command_config(["search", "--out", "o", "--rollouts", "7", str(yaml_file)]).mcts.rollouts == 7
    with pytest.raises(RunConfigError, match="unknown config key 'mcts.mode'"):
        _command_config(["search", "--out", "o", str(yaml_file), "mcts.mode=ppm"])
    with pytest.raises(RunConfigError, match="--problems is required"):
        _command_config(["search", "--model", "m", "--method", "greedy", "--out", "o"])
    with pytest.raises(RunConfigError, match="unknown config key 'sampling.temprature'"):
        _command_config(["generate", "--model", "m", "--prompt", "p", "sampling.temprature=1"])
    gen = _command_config(["generate", "--model", "m", "--prompt", "p", "--stop", "a", "b", "--no-chat"])
    assert gen.sampling.stop == ("a", "b") and gen.chat is False
    assert _command_config(["label", "ppm", "--trees", "t", "--out", "o", "--no-answer-pairs"]).pairs.answer_pairs is False


def test_help_shows_every_default(capsys):
    from rstar_jax.cli import main

    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    assert "--in-flight IN_FLIGHT problems searched at a time (0: enough to fill the engine's slots twice) (default: 0)" in flat
    assert "(default: mcts.rollouts 16, mcts_star.iterations 32)" in flat
    assert "  mcts.c                     2.0" in text and "  model                      (required)" in text


EVOLVE_LOWER = """
import json, math, sys
from rstar_jax import sharding
from rstar_jax.config import Config, load_config
from rstar_jax.engine.aot import abstract_model, lower_programs
from rstar_jax.evolve.config import load_evolve_config, training_sources
from rstar_jax.train.loop import lower_step
from rstar_jax.train.model_source import arch_model_config
import jax
path, = sys.argv[1:]
cfg, base = load_evolve_config(path)
train = load_config(training_sources(cfg.policy_train, base), cls=Config)
arch = arch_model_config(train.model.arch)
search_devices = math.prod(cfg.mesh.shape)
mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:search_devices])
engine = lower_programs(abstract_model(arch, mesh), cfg.engine, read=2)
step = lower_step(train, "sft", arch)
print(json.dumps({"engine": {k: len(v.as_text()) for k, v in engine.items()}, "train": len(step.as_text())}))
"""


@pytest.mark.slow
def test_pod_evolve_configs_lower_their_search_and_train_programs():
    """Each pod config's search (one engine per host: its `mesh` over a host's devices) and policy training (its
    training config's mesh over every device) lower on fake CPU devices of the target shape."""
    configs = sorted((REPO / "configs" / "evolve").glob("qwen*.yaml"))
    assert [p.name for p in configs] == ["qwen2.5-math-1.5b_8xh100.yaml", "qwen2.5-math-1.5b_v5p-64.yaml",
                                         "qwen2.5-math-7b_8xh100.yaml", "qwen2.5-math-7b_v5p-64.yaml"]
    for path in configs:
        from rstar_jax.evolve.config import load_evolve_config, training_sources

        cfg, base = load_evolve_config(path)
        assert (cfg.rounds, cfg.search.rollouts, cfg.search.candidates, cfg.search.max_depth) == (4, 16, 8, 16)
        assert cfg.search.modes == ("terminal", "terminal", "ppm", "ppm")
        train = load_config(training_sources(cfg.policy_train, base))
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(_devices(train)), "PYTHONPATH": str(REPO)}
        r = subprocess.run([sys.executable, "-c", EVOLVE_LOWER, str(path)], env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        sizes = json.loads(r.stdout.splitlines()[-1])
        assert sizes["train"] > 0 and all(v > 0 for v in sizes["engine"].values())
