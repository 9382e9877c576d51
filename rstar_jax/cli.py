"""rstar-jax: self-evolved deep thinking for small math reasoners (rStar-Math MCTS, ReST-MCTS*, process reward
models), in JAX, on a CPU, one GPU or a TPU pod.

The pipeline: `search` problems with a policy model (saved trees) -> `label` the trees (SFT data, PPM pairs, MC
step labels) -> `train` the policy and a reward model -> `eval` them; `evolve` runs rounds of all of it. Most
commands take their settings from YAML config files and key=value overrides after the flags (flags set the same
keys; `rstar-jax COMMAND --help` lists every key with its default); a rerun of a command with the same output
resumes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Any, Callable, Literal

# Entry points stay thin: parse the command line into the command's typed config, call the library.
# User errors (ValueError / OSError raised with a one-line message naming the input) print one line and exit 2;
# Ctrl-C prints one line and exits 130. RSTAR_JAX_DEBUG=1 shows the traceback instead.

SWITCH = object()  # Flag.const default: the flag takes a value


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command-line flag that sets config keys (all of them, to the one value given)."""

    name: str  # e.g. "--rollouts"
    keys: tuple[str, ...]
    help: str = ""
    const: Any = SWITCH  # a flag without a value that sets the keys to this
    parse: Callable[[str], Any] | None = None  # text -> value, where the key's type does not say


def flag(name: str, *keys: str, help: str = "", const: Any = SWITCH, parse: Callable[[str], Any] | None = None) -> Flag:
    return Flag(name, keys or (name.lstrip("-").replace("-", "_"),), help, const, parse)


def _argparse_kwargs(tp: Any, f: Flag) -> dict[str, Any]:
    """How argparse reads a flag for a key of type `tp`."""
    if f.const is not SWITCH:
        return {"action": "store_const", "const": f.const}
    metavar = f.name.lstrip("-").upper().replace("-", "_")
    if f.parse is not None:
        return {"type": f.parse, "metavar": metavar}
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return {"choices": list(args)}
    if type(None) in args:  # optional
        tp = next(a for a in args if a is not type(None))
        if tp is bool:
            return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(tp) is tuple:
        return {"nargs": "+", "metavar": metavar}
    return {"type": tp, "metavar": metavar}


def _default_text(defaults: dict[str, Any], keys: tuple[str, ...]) -> str:
    def one(key: str) -> str:
        value = defaults[key]
        return "required" if value is dataclasses.MISSING else f"{value!r}"

    if len({one(k) for k in keys}) == 1:
        return f"default: {one(keys[0])}"
    return "default: " + ", ".join(f"{k} {one(k)}" for k in keys)


def _keys_epilog(defaults: dict[str, Any]) -> str:
    width = max(map(len, defaults))
    lines = [f"  {k:<{width}}  {'(required)' if v is dataclasses.MISSING else repr(v)}" for k, v in defaults.items()]
    return "config keys (CONFIG.yaml files and key=value overrides after the flags; flags win):\n" + "\n".join(lines)


def add_config_args(p: argparse.ArgumentParser, cfg_cls: type, flags: list[Flag]) -> None:
    """The flags of a command whose settings are `cfg_cls`: each sets config keys; the epilog lists every key."""
    from rstar_jax.config import key_defaults, key_type

    defaults = key_defaults(cfg_cls)
    for f in flags:
        help_text = f"{f.help} ({_default_text(defaults, f.keys)})" if f.const is SWITCH else f.help
        p.add_argument(f.name, dest=f.name, default=argparse.SUPPRESS, help=help_text,
                       **_argparse_kwargs(key_type(cfg_cls, f.keys[0]), f))
    p.usage = f"{p.prog} [flags] [CONFIG.yaml ...] [key=value ...]"
    p.epilog = _keys_epilog(defaults)
    p.set_defaults(cfg_cls=cfg_cls, flags=flags, takes_overrides=True)


def command_config(a: argparse.Namespace) -> Any:
    """The command's config: its config files and overrides, then its flags."""
    from rstar_jax.config import MissingKeyError, RunConfigError, load_config

    given = {key: (getattr(a, f.name), f.name) for f in a.flags if hasattr(a, f.name) for key in f.keys}
    try:
        return load_config(a.overrides, a.cfg_cls, given)
    except MissingKeyError as e:
        names = [f.name for f in a.flags if e.key in f.keys]
        if not names:
            raise
        raise RunConfigError(f"{names[0]} is required (config key {e.key!r})") from None


# ---------------------------------------------------------------------------------------------
# Commands


def _generate(cfg) -> None:
    from rstar_jax.generation import run_generate

    run_generate(cfg)


def _exec(cfg) -> None:
    from rstar_jax.sandbox.jsonl import exec_file

    exec_file(cfg)


def _eval(cfg) -> None:
    from rstar_jax.evaluate.metrics import eval_samples
    from rstar_jax.evaluate.suite import run_eval

    if cfg.samples:
        eval_samples(cfg.samples, cfg.out, grader_workers=cfg.grader_workers)
        print(os.path.join(cfg.out, "metrics.md"))
    else:
        run_eval(cfg)
        print(os.path.join(cfg.out, "report.md"))


def _processbench(cfg) -> None:
    from rstar_jax.evaluate.processbench import run_processbench

    run_processbench(cfg)
    print(os.path.join(cfg.out, "report.md"))


def _printing(run: Callable[[Any], dict[str, Any]]) -> Callable[[Any], None]:
    """A command that prints its library call's summary as JSON."""
    return lambda cfg: print(json.dumps(run(cfg), indent=2))


def _convert(a: argparse.Namespace) -> None:
    from rstar_jax.models.hf_io import convert

    print(convert(a.model, a.out))


def _problems_synth(a: argparse.Namespace) -> None:
    from rstar_jax.data.synth import parse_levels, write_synth_file

    write_synth_file(parse_levels(a.levels), a.n, a.seed, a.out)
    print(a.out)


def _problems_sft(a: argparse.Namespace) -> None:
    from rstar_jax.data import load_problems
    from rstar_jax.data.reference_sft import write_reference_sft

    if a.limit is not None and a.limit < 1:
        raise ValueError(f"--limit {a.limit}: must be >= 1")
    write_reference_sft(load_problems(a.problems, limit=a.limit), a.out)
    print(a.out)


def _view_tree(a: argparse.Namespace) -> None:
    from rstar_jax.search.view import write_html

    print(write_html(a.tree, a.out))


def _train(a: argparse.Namespace) -> None:
    from rstar_jax.train import run_training

    run_training(a.kind, a.model, a.data, a.out, a.overrides)


def _export(a: argparse.Namespace) -> None:
    from rstar_jax.train import export_checkpoint

    print(export_checkpoint(a.checkpoint, a.out))


def _evolve(a: argparse.Namespace) -> None:
    from rstar_jax.evolve import run_evolve

    report = run_evolve(a.config, a.out, a.overrides, allow_insecure_sandbox=a.allow_insecure_sandbox)
    print(f"report: {report}")


def _compilation_cache() -> None:
    """Keep compiled XLA programs on disk (next to the model cache): a resumed or repeated job does not recompile.
    RSTAR_JAX_XLA_CACHE=0 turns it off; any other value than 1 is the folder to use."""
    setting = os.environ.get("RSTAR_JAX_XLA_CACHE", "1")
    if setting == "0":
        return
    import jax

    from rstar_jax.models.registry import cache_dir

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla") if setting == "1" else setting)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# ---------------------------------------------------------------------------------------------
# The parser. Config commands import their config class (and with it JAX) to list their keys, so only the
# command named on the command line gets its arguments: `rstar-jax --help` stays fast.

INSECURE = flag("--allow-insecure-sandbox", "sandbox.allow_insecure", const=True,
                help="run with process-only isolation where namespaces / seccomp are unavailable")
DTYPE = flag("--dtype", help="compute dtype")
TREES = "a search's output folder or its trees/"


def _generate_args(p: argparse.ArgumentParser) -> None:
    from rstar_jax.generation import GenerateConfig

    add_config_args(p, GenerateConfig, [
        flag("--model", help="HF folder, .gguf file, or alias (smollm2-135m)"),
        flag("--prompt", help="one prompt"),
        flag("--prompts", help='JSONL file of {"prompt": ...}'),
        flag("--max-new-tokens", "sampling.max_new_tokens"),
        flag("--temperature", "sampling.temperature", help="0 = greedy"),
        flag("--top-p", "sampling.top_p"),
        flag("--top-k", "sampling.top_k", help="0 = off"),
        flag("--num-samples", "sampling.num_samples"),
        flag("--stop", "sampling.stop", help="stop strings; text is cut right after the first one"),
        flag("--chat", help="wrap each prompt in the chat template as a user turn (None: when the tokenizer has one; "
                            "--no-chat: never)"),
        flag("--seed"), DTYPE, flag("--batch-size"),
        flag("--out", help="output JSONL (resumable; settings kept in OUT.settings.json); stdout when absent"),
    ])
    p.set_defaults(run=_generate)


def _exec_args(p: argparse.ArgumentParser) -> None:
    from rstar_jax.sandbox.jsonl import ExecConfig

    add_config_args(p, ExecConfig, [
        flag("--programs", help='JSONL of {"id": ..., "code": ...}'),
        flag("--out", help="output JSONL (appended; a rerun resumes after the last result); stdout when absent"),
        flag("--timeout", "sandbox.timeout_s", help="wall-clock seconds per program"),
        flag("--memory-mb", "sandbox.memory_mb"),
        flag("--workers", "sandbox.workers", help="0: one per core"),
        INSECURE,
    ])
    p.set_defaults(run=_exec)


ROLLOUTS = flag("--rollouts", "mcts.rollouts", "mcts_star.iterations", help="MCTS rollouts / ReST-MCTS* iterations")
SEARCH_COMMON = [
    flag("--max-depth", help="steps per trajectory"),
    flag("--limit", help="the first N problems (0: all)"),
    flag("--in-flight", help="problems searched at a time (0: enough to fill the engine's slots twice)"),
    flag("--seed"),
    flag("--max-new-tokens", help="per step"),
    flag("--few-shot", help="synthetic reference solutions in the prompt"),
    flag("--sandbox-workers", "sandbox.workers", help="0: one per core"),
    INSECURE, DTYPE,
]


def _search_args(p: argparse.ArgumentParser) -> None:
    from rstar_jax.search.job import SearchConfig, run_search

    add_config_args(p, SearchConfig, [
        flag("--model", help="policy: HF folder, .gguf, alias, or an exported checkpoint folder"),
        flag("--reward-model", help="PPM / value / PRM folder (ppm mode, bon, beam, mcts-star)"),
        flag("--problems", help='problem jsonl or a synthetic spec "synth:levels=1-2,n=32,seed=0"'),
        flag("--method"),
        flag("--mode", help="terminal / ppm: the gold answer guides mcts and mcts-star (training trees)"),
        ROLLOUTS,
        flag("--candidates", "mcts.candidates", "mcts_star.branch", "baseline.candidates",
             help="MCTS K / ReST-MCTS* branch / beam steps per beam"),
        flag("--samples", "baseline.samples", help="maj@k, Best-of-N N, beam width"),
        flag("--temperature", "mcts.temperature", "mcts_star.temperature", "baseline.temperature"),
        flag("--aggregation", "baseline.aggregation", help="step-score aggregation of bon and beam"),
        flag("--out", help="output folder; rerun the same command to resume"),
        *SEARCH_COMMON,
    ])
    p.set_defaults(run=_printing(run_search))


def _eval_args(p: argparse.ArgumentParser) -> None:
    from rstar_jax.evaluate.suite import EvalConfig

    add_config_args(p, EvalConfig, [
        flag("--samples", help="JSONL: per problem the gold answer and scored samples (instead of --model)"),
        flag("--model", help="policy: HF folder, .gguf, alias, or an exported checkpoint folder"),
        flag("--problems", help='with --model: problem jsonl or a synthetic spec "synth:levels=1-2,n=32,seed=0"'),
        flag("--reward-model", help="PPM / PRM folder: BoN step scores, beam search, PPM-scored MCTS"),
        flag("--out", help="output folder; rerun the same command to resume"),
        flag("--num-samples", help="one set of samples per problem for maj@N / BoN@N"),
        flag("--methods", help="comma-separated subset of greedy,samples,beam,mcts",
             parse=lambda text: tuple(m for m in text.split(",") if m)),
        flag("--temperature", "mcts.temperature", "baseline.temperature", help="samples, beam and MCTS"),
        flag("--rollouts", "mcts.rollouts", help="MCTS rollouts"),
        flag("--candidates", "mcts.candidates", "baseline.candidates", help="MCTS K / beam steps per beam"),
        flag("--beam-width"),
        flag("--grader-workers"),
        *SEARCH_COMMON,
    ])
    p.set_defaults(run=_eval)


def _processbench_args(p: argparse.ArgumentParser) -> None:
    from rstar_jax.evaluate.processbench import ProcessBenchConfig

    add_config_args(p, ProcessBenchConfig, [
        flag("--reward-model"), flag("--data", help="ProcessBench JSON / JSONL"), flag("--out"),
        flag("--calibration", help="rows to choose the threshold on (default: a seeded share of --data)"),
        flag("--calibration-fraction"), flag("--seed"), flag("--batch-size"), DTYPE,
        flag("--protocol", help="calibrated: threshold from a share of --data; official: one threshold for the "
                                "subsets official.gsm8k=F official.math=F ... (from GSM8K, or official.threshold)"),
    ])
    p.set_defaults(run=_processbench)


def _label_sft_args(p: argparse.ArgumentParser) -> None:
    from rstar_jax.labels.job import SFTLabelConfig, label_sft

    add_config_args(p, SFTLabelConfig, [
        flag("--trees", help=TREES), flag("--out", help="output JSONL"),
        flag("--top", help="trajectories per problem"),
        flag("--min-accuracy", help="drop problems whose trajectory accuracy is lower"),
    ])
    p.set_defaults(run=_printing(label_sft))


def _label_ppm_args(p: argparse.ArgumentParser) -> None:
    from rstar_jax.labels.job import PPMLabelConfig, label_ppm

    add_config_args(p, PPMLabelConfig, [
        flag("--trees", help=TREES), flag("--out", help="output JSONL"),
        flag("--min-gap", "pairs.min_gap", help="least Q(pos) - Q(neg)"),
        flag("--min-edit", "pairs.min_edit", help="least character edit distance of pos and neg"),
        flag("--no-answer-pairs", "pairs.answer_pairs", const=False,
             help="no whole-trajectory pairs for the answer step"),
    ])
    p.set_defaults(run=_printing(label_ppm))


def _label_value_args(p: argparse.ArgumentParser) -> None:
    from rstar_jax.labels.job import TreesLabelConfig, label_value

    add_config_args(p, TreesLabelConfig, [flag("--trees", help=TREES), flag("--out", help="output JSONL")])
    p.set_defaults(run=_printing(label_value))


def _label_mc_args(p: argparse.ArgumentParser) -> None:
    from rstar_jax.labels.mc import MCJobConfig, run_mc_labels

    add_config_args(p, MCJobConfig, [
        flag("--trees", help=TREES + ", or a JSONL of {id, question, answer, steps}"),
        flag("--policy", help="completion model: HF folder, .gguf or alias"),
        flag("--out", help="output JSONL; rerun the same command to resume"),
        flag("--k", "mc.k", help="completions per step"),
        flag("--threshold", "mc.threshold", help="hard label 1 when at least this many are correct"),
        flag("--labels", "mc.labels"),
        flag("--per-problem", help="trajectories labelled per tree"),
        flag("--temperature", "mc.temperature"),
        flag("--batch", "mc.batch", help="completions advanced together"),
        flag("--seed"), flag("--max-new-tokens", help="per step"), flag("--max-steps"),
        flag("--sandbox-workers", "sandbox.workers", help="0: one per core"),
        flag("--sandbox-timeout", "sandbox.timeout_s", help="seconds per program"),
        INSECURE, DTYPE,
    ])
    p.set_defaults(run=_printing(run_mc_labels))


def _label_consensus_args(p: argparse.ArgumentParser) -> None:
    from rstar_jax.labels.consensus import ConsensusConfig, run_consensus

    add_config_args(p, ConsensusConfig, [
        flag("--mc", help="MC-label JSONL from `rstar-jax label mc`"),
        flag("--judge", help="judge model: HF folder, .gguf or alias"),
        flag("--out", help="kept records (PRM JSONL); judgements resume from OUT.judged.jsonl"),
        flag("--max-new-tokens"), flag("--batch-size"),
        flag("--chat", help="wrap prompts in the chat template (None: when the tokenizer has one)"),
        DTYPE,
    ])
    p.set_defaults(run=_printing(run_consensus))


def _train_args(t: argparse.ArgumentParser) -> None:
    from rstar_jax.config import Config, key_defaults

    t.add_argument("kind", choices=["sft", "ppm", "prm", "value"])
    t.add_argument("--model", required=True, help="HF folder, .gguf, alias, or 'random' (model.arch from the config)")
    t.add_argument("--data", required=True, help="JSONL in the format of KIND (see rstar_jax/train/data.py)")
    t.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl; rerun to resume")
    t.usage = "rstar-jax train {sft,ppm,prm,value} --model M --data FILE --out DIR [CONFIG.yaml ...] [key=value ...]"
    t.epilog = _keys_epilog(key_defaults(Config))
    t.set_defaults(run=_train, takes_overrides=True)  # trailing config .yaml files and key=value overrides, in order


def _evolve_args(e: argparse.ArgumentParser) -> None:
    from rstar_jax.config import key_defaults
    from rstar_jax.evolve.config import EvolveConfig

    e.add_argument("--config", required=True, help="evolve config (configs/evolve/*.yaml)")
    e.add_argument("--out", required=True, help="run folder; rerun the same command to resume")
    e.add_argument("--allow-insecure-sandbox", action="store_true")
    e.usage = "rstar-jax evolve --config CONFIG.yaml --out RUN_DIR [key=value ...]"
    e.epilog = _keys_epilog(key_defaults(EvolveConfig))
    e.set_defaults(run=_evolve, takes_overrides=True)  # trailing key=value overrides of the evolve config


def _plain_args(run: Callable[[argparse.Namespace], None], *specs: tuple[str, dict[str, Any]]):
    """The arguments of a command without a config (argparse options as given)."""
    def add(p: argparse.ArgumentParser) -> None:
        for name, kwargs in specs:
            p.add_argument(name, **kwargs)
        p.set_defaults(run=run)

    return add


REQUIRED = {"required": True}
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {  # name -> (help, adds its arguments)
    "generate": ("sample completions from a causal LM", _generate_args),
    "convert": ("GGUF or HF folder in, HF folder out (through our parameter tree)",
                _plain_args(_convert, ("--model", REQUIRED), ("--out", REQUIRED))),
    "exec": ("run model-written programs in the sandbox", _exec_args),
    "problems synth": ("synthetic arithmetic word problems with reference step solutions", _plain_args(
        _problems_synth, ("--levels", {"default": "1-5", "help": 'difficulty levels, e.g. "1-5" or "1,3"'}),
        ("--n", {"type": int, "default": 1000}), ("--seed", {"type": int, "default": 0}), ("--out", REQUIRED))),
    "problems sft": ("policy SFT records {prompt, response} from reference solutions", _plain_args(
        _problems_sft,
        ("--problems", {"required": True, "help": "problem file or synthetic spec, e.g. synth:levels=1-2,n=200,seed=0"}),
        ("--limit", {"type": int}), ("--out", REQUIRED))),
    "search": ("MCTS / ReST-MCTS* / baselines over problems: trees, results.jsonl, summary.json", _search_args),
    "view-tree": ("render a saved search tree as one self-contained HTML page",
                  _plain_args(_view_tree, ("tree", {"help": "DIR/trees/<id>.json"}), ("--out", REQUIRED))),
    "label sft": ("policy SFT {prompt, response}: per problem the top correct trajectories by mean Q",
                  _label_sft_args),
    "label ppm": ("PPM preference pairs {prompt, pos, neg, pos_count, neg_count}", _label_ppm_args),
    "label value": ("ReST-MCTS* value targets {prompt, steps, values}", _label_value_args),
    "label mc": ("Monte-Carlo step labels {prompt, steps, labels} (PRM data); resumable", _label_mc_args),
    "label consensus": ("keep MC-labelled solutions whose first error an LLM judge confirms", _label_consensus_args),
    "train": ("policy SFT, PPM (pairwise), PRM (per step) or value-model training", _train_args),
    "export": ("checkpoint -> HF folder (causal LM or *ForTokenClassification)",
               _plain_args(_export, ("--checkpoint", REQUIRED), ("--out", REQUIRED))),
    "eval": ("greedy, maj@N, BoN@N (min, product, last), beam, MCTS: of a model on problems (--model --problems) "
             "or from a samples file (--samples)", _eval_args),
    "processbench": ("ProcessBench first-error F1 of a reward model", _processbench_args),
    "evolve": ("self-evolution rounds: MCTS -> SFT data -> policy -> PPM pairs -> PPM -> eval", _evolve_args),
}
GROUPS = {"problems": "problem sets",
          "label": "training data from saved trees: sft, ppm pairs, mc labels, consensus, value"}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the command that `argv` names gets its arguments (every command without `argv`)."""
    p = argparse.ArgumentParser(prog="rstar-jax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, Any] = {}
    for name, (help_text, add_args) in COMMANDS.items():
        *group, word = name.split()
        parent = sub
        if group:
            if group[0] not in groups:
                g = sub.add_parser(group[0], help=GROUPS[group[0]], description=GROUPS[group[0]])
                groups[group[0]] = g.add_subparsers(dest="kind", required=True, metavar="KIND")
            parent = groups[group[0]]
        q = parent.add_parser(word, help=help_text, description=help_text,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        if argv is None or argv[: len(group) + 1] == [*group, word]:
            add_args(q)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not (getattr(args, "takes_overrides", False) and not any(x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    from rstar_jax.backends import cpu

    cpu.configure_flags()  # before JAX starts a backend
    try:
        cfg = command_config(args) if hasattr(args, "cfg_cls") else args
        _compilation_cache()
        args.run(cfg)
    except KeyboardInterrupt:
        print(f"rstar-jax {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130
    except (ValueError, OSError) as e:
        if os.environ.get("RSTAR_JAX_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        print(f"rstar-jax {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    """The console script: after Ctrl-C, exit at once (interpreter shutdown with XLA work in flight can crash)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 130:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
