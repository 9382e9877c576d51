"""`rstar-jax` command line: parse arguments, call library functions. Nothing else lives here.

User errors (ValueError / OSError subclasses raised with a one-line message naming the input) print one line and
exit 2. Set RSTAR_JAX_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _generate(a: argparse.Namespace) -> None:
    from rstar_jax.generation import read_prompts, run_generate
    from rstar_jax.engine import SamplingConfig

    prompts = [a.prompt] if a.prompt is not None else read_prompts(a.prompts)
    settings = SamplingConfig(
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
        num_samples=a.num_samples, stop=tuple(a.stop or ()),
    )
    run_generate(a.model, prompts, settings, chat=a.chat, seed=a.seed, compute_dtype=a.dtype, out=a.out,
                 batch_size=a.batch_size)


def _convert(a: argparse.Namespace) -> None:
    from rstar_jax.models.hf_io import convert

    print(convert(a.model, a.out))


def _exec(a: argparse.Namespace) -> None:
    from rstar_jax.sandbox import exec_file

    exec_file(a.programs, a.out, a.timeout, a.memory_mb, a.workers, a.allow_insecure_sandbox)


def _problems_synth(a: argparse.Namespace) -> None:
    from rstar_jax.data.synth import parse_levels, write_synth_file

    write_synth_file(parse_levels(a.levels), a.n, a.seed, a.out)
    print(a.out)


def _problems_sft(a: argparse.Namespace) -> None:
    from rstar_jax.data import load_problems
    from rstar_jax.data.reference_sft import write_reference_sft

    write_reference_sft(load_problems(a.problems, limit=a.limit), a.out)
    print(a.out)


def _eval(a: argparse.Namespace) -> None:
    from rstar_jax.evaluate.metrics import eval_samples
    from rstar_jax.evaluate.suite import EvalSuiteError, run_eval

    if (a.samples is None) == (a.model is None):
        raise EvalSuiteError("give either --samples FILE or --model M --problems FILE (not both)")
    if a.samples is not None:
        eval_samples(a.samples, a.out, grader_workers=a.grader_workers)
        print(os.path.join(a.out, "metrics.md"))
        return
    if a.problems is None:
        raise EvalSuiteError("--model: needs --problems FILE (a problem jsonl or a synth:... spec)")
    run_eval(a.model, a.problems, a.out, reward_model=a.reward_model, num_samples=a.num_samples,
             methods=a.methods.split(","), limit=a.limit, batch=a.batch, seed=a.seed, max_depth=a.max_depth,
             max_new_tokens=a.max_new_tokens, few_shot=a.few_shot, temperature=a.temperature, rollouts=a.rollouts,
             candidates=a.candidates, beam_width=a.beam_width, dtype=a.dtype, sandbox_workers=a.sandbox_workers,
             allow_insecure_sandbox=a.allow_insecure_sandbox, grader_workers=a.grader_workers)
    print(os.path.join(a.out, "report.md"))


def _processbench(a: argparse.Namespace) -> None:
    from rstar_jax.evaluate.processbench import run_processbench

    run_processbench(a.reward_model, a.data, a.out, calibration_path=a.calibration,
                     calibration_fraction=a.calibration_fraction, seed=a.seed, batch_size=a.batch_size,
                     compute_dtype=a.dtype)
    print(os.path.join(a.out, "report.md"))


def _search(a: argparse.Namespace) -> None:
    from rstar_jax.search.job import run_search

    summary = run_search(
        a.model, a.problems, a.method, a.out, reward_model=a.reward_model, rollouts=a.rollouts,
        candidates=a.candidates, samples=a.samples, max_depth=a.max_depth, mode=a.mode, limit=a.limit, batch=a.batch,
        seed=a.seed, temperature=a.temperature, max_new_tokens=a.max_new_tokens, few_shot=a.few_shot,
        aggregation=a.aggregation, sandbox_workers=a.sandbox_workers, allow_insecure_sandbox=a.allow_insecure_sandbox,
        dtype=a.dtype,
    )
    print(json.dumps(summary, indent=2))


def _view_tree(a: argparse.Namespace) -> None:
    from rstar_jax.search.view import write_html

    print(write_html(a.tree, a.out))


def _label_trees(a: argparse.Namespace) -> None:
    from rstar_jax.labels.job import label_ppm, label_sft, label_value
    from rstar_jax.labels.ppm_pairs import PairConfig

    if a.label_command == "sft":
        summary = label_sft(a.trees, a.out, top=a.top, min_accuracy=a.min_accuracy)
    elif a.label_command == "ppm":
        summary = label_ppm(a.trees, a.out, PairConfig(a.min_gap, a.min_edit, not a.no_answer_pairs))
    else:
        summary = label_value(a.trees, a.out)
    print(json.dumps(summary, indent=2))


def _label_mc(a: argparse.Namespace) -> None:
    from rstar_jax.labels.mc import MCConfig, run_mc_labels

    cfg = MCConfig(k=a.k, threshold=a.threshold, temperature=a.temperature, labels=a.labels, batch=a.batch)
    summary = run_mc_labels(a.policy, a.trees, a.out, cfg, seed=a.seed, per_problem=a.per_problem,
                            max_new_tokens=a.max_new_tokens, max_steps=a.max_steps, sandbox_workers=a.sandbox_workers,
                            sandbox_timeout_s=a.sandbox_timeout, allow_insecure_sandbox=a.allow_insecure_sandbox)
    print(json.dumps(summary, indent=2))


def _label_consensus(a: argparse.Namespace) -> None:
    from rstar_jax.labels.consensus import run_consensus

    report = run_consensus(a.judge, a.mc, a.out, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                           chat=a.chat)
    print(json.dumps(report, indent=2))


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rstar-jax", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="sample completions from a causal LM")
    g.add_argument("--model", required=True, help="HF folder, .gguf file, or alias (smollm2-135m)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompts", help='JSONL file of {"prompt": ...}')
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--stop", nargs="+", help="stop strings; text is cut right after the first one")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template as a user turn")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--out", help="output JSONL (resumable); stdout when absent")
    g.set_defaults(fn=_generate)

    c = sub.add_parser("convert", help="GGUF or HF folder in, HF folder out (through our parameter tree)")
    c.add_argument("--model", required=True)
    c.add_argument("--out", required=True)
    c.set_defaults(fn=_convert)

    e = sub.add_parser("exec", help="run model-written programs in the sandbox")
    e.add_argument("--programs", required=True, help='JSONL of {"id": ..., "code": ...}')
    e.add_argument("--out", help="output JSONL; stdout when absent")
    e.add_argument("--timeout", type=float, default=5.0, help="wall-clock seconds per program")
    e.add_argument("--memory-mb", type=int, default=1024)
    e.add_argument("--workers", type=int, default=None, help="default: one per core")
    e.add_argument("--allow-insecure-sandbox", action="store_true",
                   help="run with process-only isolation when namespaces/seccomp are unavailable")
    e.set_defaults(fn=_exec)

    pr = sub.add_parser("problems", help="problem sets")
    prs = pr.add_subparsers(dest="problems_command", required=True)
    s = prs.add_parser("synth", help="synthetic arithmetic word problems with reference step solutions")
    s.add_argument("--levels", default="1-5", help='difficulty levels, e.g. "1-5" or "1,3"')
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_problems_synth)
    f = prs.add_parser("sft", help="policy SFT records {prompt, response} from reference solutions")
    f.add_argument("--problems", required=True, help="problem file or synthetic spec, e.g. synth:levels=1-2,n=200,seed=0")
    f.add_argument("--limit", type=int)
    f.add_argument("--out", required=True)
    f.set_defaults(fn=_problems_sft)

    se = sub.add_parser("search", help="MCTS / ReST-MCTS* / baselines over problems: trees, results.jsonl, summary.json")
    se.add_argument("--model", required=True)
    se.add_argument("--reward-model", help="PPM / value / PRM folder (ppm mode, bon, beam, mcts-star)")
    se.add_argument("--problems", required=True, help='problem jsonl or a synthetic spec "synth:levels=1-2,n=32,seed=0"')
    se.add_argument("--method", required=True, choices=["mcts", "mcts-star", "greedy", "maj", "bon", "beam"])
    se.add_argument("--rollouts", type=int, help="mcts rollouts (16) / mcts-star iterations (32)")
    se.add_argument("--candidates", type=int, help="mcts K (8) / mcts-star branch (3) / beam steps per beam (4)")
    se.add_argument("--samples", type=int, help="maj@k, Best-of-N N, beam width (8)")
    se.add_argument("--max-depth", type=int, default=16)
    se.add_argument("--mode", choices=["terminal", "ppm", "inference"], default="terminal")
    se.add_argument("--out", required=True, help="output folder; rerun the same command to resume")
    se.add_argument("--limit", type=int)
    se.add_argument("--batch", type=int, default=8, help="problems searched together")
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--temperature", type=float)
    se.add_argument("--max-new-tokens", type=int, default=256, help="per step")
    se.add_argument("--few-shot", type=int, default=2, help="synthetic reference solutions in the prompt")
    se.add_argument("--aggregation", choices=["min", "product", "last"], default="min")
    se.add_argument("--sandbox-workers", type=int)
    se.add_argument("--allow-insecure-sandbox", action="store_true")
    se.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    se.set_defaults(fn=_search)

    vt = sub.add_parser("view-tree", help="render a saved search tree as one self-contained HTML page")
    vt.add_argument("tree", help="DIR/trees/<id>.json")
    vt.add_argument("--out", required=True)
    vt.set_defaults(fn=_view_tree)

    lb = sub.add_parser("label", help="training data from saved trees: sft, ppm pairs, mc labels, consensus, value")
    lbs = lb.add_subparsers(dest="label_command", required=True)
    trees_help = "a search's output folder or its trees/"
    ls = lbs.add_parser("sft", help="policy SFT {prompt, response}: per problem the top correct trajectories by mean Q")
    ls.add_argument("--top", type=int, default=2, help="trajectories per problem")
    ls.add_argument("--min-accuracy", type=float, default=0.0, help="drop problems whose trajectory accuracy is lower")
    lp = lbs.add_parser("ppm", help="PPM preference pairs {prompt, pos, neg, pos_count, neg_count}")
    lp.add_argument("--min-gap", type=float, default=0.5, help="least Q(pos) - Q(neg)")
    lp.add_argument("--min-edit", type=int, default=20, help="least character edit distance of pos and neg")
    lp.add_argument("--no-answer-pairs", action="store_true", help="no whole-trajectory pairs for the answer step")
    lv = lbs.add_parser("value", help="ReST-MCTS* value targets {prompt, steps, values}")
    for q in (ls, lp, lv):
        q.add_argument("--trees", required=True, help=trees_help)
        q.add_argument("--out", required=True, help="output JSONL")
        q.set_defaults(fn=_label_trees)
    lm = lbs.add_parser("mc", help="Monte-Carlo step labels {prompt, steps, labels} (PRM data); resumable")
    lm.add_argument("--trees", required=True, help=trees_help + ", or a JSONL of {id, question, answer, steps}")
    lm.add_argument("--policy", required=True, help="completion model: HF folder, .gguf or alias")
    lm.add_argument("--out", required=True, help="output JSONL; rerun the same command to resume")
    lm.add_argument("--k", type=int, default=8, help="completions per step")
    lm.add_argument("--threshold", type=int, default=1, help="hard label 1 when at least this many are correct")
    lm.add_argument("--labels", choices=["soft", "hard"], default="soft")
    lm.add_argument("--per-problem", type=int, default=4, help="trajectories labelled per tree")
    lm.add_argument("--temperature", type=float, default=0.7)
    lm.add_argument("--batch", type=int, default=64, help="completions advanced together")
    lm.add_argument("--seed", type=int, default=0)
    lm.add_argument("--max-new-tokens", type=int, default=256, help="per step")
    lm.add_argument("--max-steps", type=int, default=16)
    lm.add_argument("--sandbox-workers", type=int)
    lm.add_argument("--sandbox-timeout", type=float, default=5.0, help="seconds per program")
    lm.add_argument("--allow-insecure-sandbox", action="store_true")
    lm.set_defaults(fn=_label_mc)
    lc = lbs.add_parser("consensus", help="keep MC-labelled solutions whose first error an LLM judge confirms")
    lc.add_argument("--mc", required=True, help="MC-label JSONL from `rstar-jax label mc`")
    lc.add_argument("--judge", required=True, help="judge model: HF folder, .gguf or alias")
    lc.add_argument("--out", required=True, help="kept records (PRM JSONL); judgements resume from OUT.judged.jsonl")
    lc.add_argument("--max-new-tokens", type=int, default=512)
    lc.add_argument("--batch-size", type=int, default=8)
    lc.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="wrap prompts in the chat template (default: when the tokenizer has one)")
    lc.set_defaults(fn=_label_consensus)

    t = sub.add_parser("train", help="policy SFT, PPM (pairwise), PRM (per step) or value-model training",
                       usage="rstar-jax train {sft,ppm,prm,value} --model M --data FILE --out DIR [CONFIG.yaml ...] [key=value ...]")
    t.add_argument("kind", choices=["sft", "ppm", "prm", "value"])
    t.add_argument("--model", required=True, help="HF folder, .gguf, alias, or 'random' (model.arch from the config)")
    t.add_argument("--data", required=True, help="JSONL in the format of KIND (see rstar_jax/train/data.py)")
    t.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl; rerun to resume")
    t.set_defaults(fn=_train, takes_overrides=True)  # trailing config .yaml files and key=value overrides, in order

    x = sub.add_parser("export", help="checkpoint -> HF folder (causal LM or *ForTokenClassification)")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    x.set_defaults(fn=_export)

    ev = sub.add_parser("eval", help="greedy, maj@N, BoN@N (min, product, last), beam, MCTS: of a model on problems "
                                     "(--model --problems) or from a samples file (--samples)")
    ev.add_argument("--samples", help="JSONL: per problem the gold answer and scored samples (instead of --model)")
    ev.add_argument("--model", help="policy: HF folder, .gguf, alias, or an exported checkpoint folder")
    ev.add_argument("--problems", help='with --model: problem jsonl or a synthetic spec "synth:levels=1-2,n=32,seed=0"')
    ev.add_argument("--reward-model", help="PPM / PRM folder: BoN step scores, beam search, PPM-scored MCTS")
    ev.add_argument("--out", required=True, help="output folder; rerun the same command to resume")
    ev.add_argument("--num-samples", type=int, default=64, help="one set of samples per problem for maj@N / BoN@N")
    ev.add_argument("--methods", default="greedy,samples,beam,mcts", help="comma-separated subset")
    ev.add_argument("--limit", type=int)
    ev.add_argument("--batch", type=int, default=8, help="problems searched together")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--max-depth", type=int, default=16)
    ev.add_argument("--max-new-tokens", type=int, default=256, help="per step")
    ev.add_argument("--few-shot", type=int, default=2, help="synthetic reference solutions in the prompt")
    ev.add_argument("--temperature", type=float, help="samples, beam and MCTS (default 0.8)")
    ev.add_argument("--rollouts", type=int, help="MCTS rollouts (16)")
    ev.add_argument("--candidates", type=int, help="MCTS K (8) / beam steps per beam (4)")
    ev.add_argument("--beam-width", type=int, default=4)
    ev.add_argument("--sandbox-workers", type=int)
    ev.add_argument("--allow-insecure-sandbox", action="store_true")
    ev.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ev.add_argument("--grader-workers", type=int, default=1)
    ev.set_defaults(fn=_eval)

    pb = sub.add_parser("processbench", help="ProcessBench first-error F1 of a reward model")
    pb.add_argument("--reward-model", required=True)
    pb.add_argument("--data", required=True, help="ProcessBench JSON / JSONL")
    pb.add_argument("--out", required=True)
    pb.add_argument("--calibration", help="rows to choose the threshold on (default: a seeded share of --data)")
    pb.add_argument("--calibration-fraction", type=float, default=0.5)
    pb.add_argument("--seed", type=int, default=0)
    pb.add_argument("--batch-size", type=int, default=16)
    pb.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    pb.set_defaults(fn=_processbench)
    ev2 = sub.add_parser("evolve", help="self-evolution rounds: MCTS -> SFT data -> policy -> PPM pairs -> PPM -> eval",
                         usage="rstar-jax evolve --config CONFIG.yaml --out RUN_DIR [key=value ...]")
    ev2.add_argument("--config", required=True, help="evolve config (configs/evolve/*.yaml)")
    ev2.add_argument("--out", required=True, help="run folder; rerun the same command to resume")
    ev2.add_argument("--allow-insecure-sandbox", action="store_true")
    ev2.set_defaults(fn=_evolve, takes_overrides=True)  # trailing key=value overrides of the evolve config
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not (getattr(args, "takes_overrides", False) and not any(x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    from rstar_jax.backends import cpu

    cpu.configure_flags()  # before JAX starts a backend
    _compilation_cache()
    try:
        args.fn(args)
    except (ValueError, OSError) as e:
        if os.environ.get("RSTAR_JAX_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        print(f"rstar-jax {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
