"""rStar-Math MCTS and ReST-MCTS* drivers on a toy environment with a known best path (scripted policy, real
sandbox): exact hand-computed trees, modes, answer selection, batch independence, and a tiny random LM end to end."""

import jax
import numpy as np
import pytest

from rstar_jax.math.steps import StepRunner
from rstar_jax.models.config import ModelConfig
from rstar_jax.models.params import init_params
from rstar_jax.engine import Completion, prepare
from rstar_jax.search import mcts, mcts_star
from rstar_jax.search.batch_state import BatchCheckpoint
from rstar_jax.search.policy import LMProposer, Request, Stats, StepEnv
from rstar_jax.search.tree import Tree
from rstar_jax.math.steps import observation_text
from rstar_jax.search.policy import question_prompt
from search_fixtures import (FIRST, SECOND, ScriptedProposer, grader, sandbox, toy_problem,  # noqa: F401 (fixtures)
                             toy_scorer)


def make_env(sandbox, grader, tokenizer, proposer, scorer=None, max_depth=6):
    return StepEnv(proposer, StepRunner(sandbox.run, max_steps=max_depth), tokenizer, grader, step_len=96,
                   scorer=scorer)


def texts(saved):
    return [n["text"] for n in saved.nodes]


def test_terminal_mode_hand_computed_tree(sandbox, grader, tiny_tokenizer):
    env = make_env(sandbox, grader, tiny_tokenizer, ScriptedProposer())
    cfg = mcts.MCTSConfig(mode="terminal", rollouts=2, candidates=2)
    [res] = mcts.search(env, [toy_problem(6)], [jax.random.key(0)], cfg)
    t = res.tree
    # rollout 1: root -> {x=2 (1), x=3 (2)}; unvisited children score 0 -> first: x=2 -> {*2 -> 4 (3), +1 -> 3 (4)}
    # -> node 3 -> {boxed 4 (5), boxed 0 dropped: one answer per expansion}; 4 != 6: -1 backed up to the root.
    # rollout 2: x=2 has Q=-1 < 0 = unvisited x=3 -> {*2 -> 6 (6), +1 -> 4 (7)} -> node 6 -> boxed 6 (8): +1.
    assert t.num_nodes == 9
    assert t.arrays["parent"].tolist() == [-1, 0, 0, 1, 1, 3, 2, 2, 6]
    assert t.arrays["visits"].tolist() == [2, 1, 1, 1, 0, 1, 1, 0, 1]
    np.testing.assert_allclose(t.arrays["value"], [0, -1, 1, -1, 0, -1, 1, 0, 1])
    assert t.arrays["terminal"].tolist()[5] == Tree.ANSWER and t.arrays["correct"].tolist()[5::3] == [0, 1]
    assert "<output>6<end_of_output>" in t.nodes[6]["text"] and t.nodes[8]["answer"] == "6"
    assert res.answer == res.best_answer == "6" and res.solved is True
    # every prompt is the question's tokens + the path's node tokens, gathered on device
    for call in env.propose.calls:
        for r in call:
            want = env.question_ids(r.problem) + tuple(i for s in r.path_texts for i in tiny_tokenizer.encode(s))
            assert r.prompt_ids == want


def test_invalid_and_duplicate_candidates_are_not_children(sandbox, grader, tiny_tokenizer):
    env = make_env(sandbox, grader, tiny_tokenizer, ScriptedProposer())
    [res] = mcts.search(env, [toy_problem(8)], [jax.random.key(0)], mcts.MCTSConfig(rollouts=1, candidates=8))
    first = [n for n, p in zip(res.tree.nodes, res.tree.arrays["parent"]) if p == 0]
    # 8 samples cycle through 5 texts: 5 distinct children; x = 1 / 0 is an invalid terminal with its error
    assert len(first) == 5
    bad = next(n for n in first if "1 / 0" in n["text"])
    assert bad["kind"] == "invalid" and bad["exec_status"] == "error" and "ZeroDivisionError" in bad["observation"]


def test_env_expand_dedupes_grades_scores_and_checks_step_length(sandbox, grader, tiny_tokenizer):
    env = make_env(sandbox, grader, tiny_tokenizer, ScriptedProposer(), scorer=toy_scorer("6"))
    p = toy_problem(6)
    after = ("<code>\nx = 3\n<end_of_step>", "print(x * 2)\n<end_of_code>\n<output>6<end_of_output>")
    req = Request(0, p, after, (), jax.random.key(0))
    [row] = env.expand([req], 5, 1.0, grade=True, score=True)  # 5 samples of 2 answer texts
    assert [c.answer for c in row] == ["6", "0"] and [c.correct for c in row] == [True, False]
    assert [c.score for c in row] == [0.9, -0.5] and [c.num_tokens for c in row] == [1, 2]
    [row] = env.expand([req], 5, 1.0, grade=False, score=False, one_answer=True)
    assert [c.answer for c in row] == ["6"] and row[0].correct is None and row[0].score is None
    assert sum(env.stats.tokens.values()) == 2 * (1 + 2 + 3 + 4 + 5)
    # rStar-Math keeps the first sample that stopped at <end_of_answer> and drops every other one, code too
    mixed = ["<code>\nx = 3\n<end_of_step>", "<answer>\\boxed{7}<end_of_answer>", "<code>\nx = 4\n<end_of_step>",
             "<answer>\\boxed{8}<end_of_answer>"]
    env.propose = lambda reqs, num, temp: [[Completion(t, [7], "stop") for t in mixed] for _ in reqs]
    [row] = env.expand([Request(0, p, (), (), jax.random.key(0))], 4, 1.0, grade=False, score=False, one_answer=True)
    assert [c.text for c in row] == [mixed[1]]
    [row] = env.expand([Request(0, p, (), (), jax.random.key(0))], 4, 1.0, grade=False, score=False)
    assert [c.text for c in row] == mixed  # ReST-MCTS* and the baselines keep every distinct sample
    short = StepEnv(ScriptedProposer(), StepRunner(sandbox.run, 6), tiny_tokenizer, grader, step_len=8)
    [row] = short.expand([Request(0, p, (), (), jax.random.key(0))], 1, 1.0, grade=False, score=False)
    assert row[0].kind.value == "invalid" and "step buffer 8" in row[0].reason and len(row[0].token_ids) == 8


def test_mcts_finds_known_best_path_and_modes(sandbox, grader, tiny_tokenizer):
    problem = toy_problem(10)  # only x = 5 then x * 2 is right; x = 5 is the 4th first-step candidate

    def run(mode, rollouts):
        env = make_env(sandbox, grader, tiny_tokenizer, ScriptedProposer(), scorer=toy_scorer("10"))
        [res] = mcts.search(env, [problem], [jax.random.key(1)], mcts.MCTSConfig(mode, rollouts, candidates=5))
        return res

    # unguided (terminal rewards only, unvisited children score 0): 4 rollouts revisit x = 2 and miss, 8 find it
    assert run("terminal", 4).answer != "10" and not run("terminal", 4).solved
    for mode, rollouts in (("terminal", 8), ("ppm", 4), ("inference", 4)):
        res = run(mode, rollouts)
        assert res.answer == "10", mode
        assert res.solved is (None if mode == "inference" else True)
        v = res.tree.arrays
        x5 = next(i for i, n in enumerate(res.tree.nodes) if n["text"] == "<code>\nx = 5\n<end_of_step>")
        siblings = [i for i in range(res.tree.num_nodes) if v["parent"][i] == 0 and i != x5]
        assert all(v["value"][x5] > v["value"][i] for i in siblings), mode
        if mode != "terminal":  # new non-terminal nodes start with the PPM score as one visit
            assert v["first_value"][x5] == pytest.approx(0.9)
        if mode == "inference":  # no gold answer anywhere
            assert all(n.get("correct") is None for n in res.tree.nodes)


def test_weighted_vote_differs_from_best_value(grader):
    # three answers equivalent to 1/2 with moderate values outvote one 3 with the single best value
    answers, values = ["0.5", "\\frac{1}{2}", "3", "1/2"], [0.2, 0.3, 0.9, 0.1]
    vote, best = mcts.choose_answer(grader, answers, values, [(v + 1) / 2 for v in values], top_n=4)
    assert best == "3" and vote in ("0.5", "\\frac{1}{2}", "1/2")
    vote, _ = mcts.choose_answer(grader, answers, values, [(v + 1) / 2 for v in values], top_n=2)
    assert vote == "3"  # only the top 2 by value vote: 3 (0.95) vs 1/2 (0.65)


def toy_batch(driver: str, iterations: int):
    """Three toy problems with their keys, and the driver with a config of `iterations` rollouts / iterations."""
    problems = [toy_problem(t) for t in (6, 8, 10)]
    keys = [jax.random.key(s) for s in (3, 4, 5)]
    if driver == "mcts":
        return problems, keys, mcts.search, mcts.MCTSConfig(rollouts=iterations, candidates=3)
    return problems, keys, mcts_star.search, mcts_star.StarSearchConfig(mode="terminal", iterations=iterations,
                                                                        branch=3)


def assert_same_result(a, b):
    assert texts(a.tree) == texts(b.tree) and a.answer == b.answer
    for name, arr in a.tree.arrays.items():
        np.testing.assert_array_equal(arr, b.tree.arrays[name], err_msg=name)


@pytest.mark.parametrize("driver", ["mcts", "mcts-star"])
def test_batched_search_equals_each_problem_alone(sandbox, grader, tiny_tokenizer, driver):
    problems, keys, run, cfg = toy_batch(driver, 3 if driver == "mcts" else 5)

    def go(ps, ks):
        return run(make_env(sandbox, grader, tiny_tokenizer, ScriptedProposer(shuffle=True)), ps, ks, cfg)

    batched = go(problems, keys)
    for p, k, b in zip(problems, keys, batched):
        [alone] = go([p], [k])
        assert_same_result(alone, b)
    assert len({len(b.tree.nodes) for b in batched} | {tuple(texts(b.tree)) for b in batched}) > 1  # keys matter


class Killed(Exception):
    pass


class DiesAfter(ScriptedProposer):
    """The scripted policy, killed (an exception) at its `calls`-th call."""

    def __init__(self, calls: int):
        super().__init__(shuffle=True)
        self.left = calls

    def __call__(self, requests, num, temperature):
        self.left -= 1
        if self.left < 0:
            raise Killed
        return super().__call__(requests, num, temperature)


@pytest.mark.parametrize("driver", ["mcts", "mcts-star"])
def test_killed_problems_resume_from_their_state_files_with_the_same_trees(sandbox, grader, tiny_tokenizer, driver,
                                                                         tmp_path):
    """Every problem in flight saves its state after each expansion (MCTS) or iteration (ReST-MCTS*); a search
    killed at any call and run again builds the same trees, repeating at most the expansions that were in flight."""
    problems, keys, run, cfg = toy_batch(driver, 4 if driver == "mcts" else 6)

    def states(tag="same"):
        return lambda p: BatchCheckpoint(tmp_path / f"{p.id}.npz", {"id": p.id, "driver": driver, "tag": tag})

    def go(proposer, checkpoint_of=None):
        env = make_env(sandbox, grader, tiny_tokenizer, proposer)
        return env, run(env, problems, keys, cfg, checkpoint_of=checkpoint_of)

    whole_env, whole = go(ScriptedProposer(shuffle=True))
    total = len(whole_env.propose.calls)
    levels, redone = [], []
    for kill in (4, 5, 7, 11):
        for f in tmp_path.glob("*.npz"):
            f.unlink()
        with pytest.raises(Killed):
            go(DiesAfter(kill), states())
        saved = [states()(p).load(Stats()) for p in problems]
        levels += [s.level for s in saved if s is not None]
        rest = DiesAfter(1000)
        env, resumed = go(rest, states())
        if driver == "mcts":  # saved after every expansion: only the ones in flight (one per problem) are redone
            assert total - kill <= len(rest.calls) <= total - kill + len(problems)
        else:  # saved after every iteration (roll-forward calls included)
            assert total >= len(rest.calls) > 0
        redone.append(len(rest.calls))
        for a, b in zip(whole, resumed):
            assert_same_result(a, b)
        assert env.stats.tokens.keys() == whole_env.stats.tokens.keys()
    assert min(redone) < total  # some kill left saved work behind
    if driver == "mcts":
        assert any(levels)  # at least one kill cut a rollout short
    # a state file of another search is not used
    other = DiesAfter(1000)
    go(other, states("another"))
    assert len(other.calls) == len(whole_env.propose.calls)


def test_mcts_star_end_gate_rollout_and_answer(sandbox, grader, tiny_tokenizer):
    env = make_env(sandbox, grader, tiny_tokenizer, ScriptedProposer(), scorer=toy_scorer("8"))
    cfg = mcts_star.StarSearchConfig(mode="inference", iterations=20, branch=5)
    [res] = mcts_star.search(env, [toy_problem(8)], [jax.random.key(0)], cfg)
    t = res.tree
    assert res.answer == "8" and t.meta["stopped_by_end_gate"]
    # values live in [0, 1]; the value model's 0.9 maps to 0.95 >= end gate, so it stopped at that answer
    assert (t.arrays["value"] >= 0).all() and (t.arrays["value"] <= 1).all()
    answers = [i for i, n in enumerate(t.nodes) if n["kind"] == "answer_terminal"]
    values = {t.nodes[i]["answer"]: float(t.arrays["value"][i]) for i in answers}
    assert values == pytest.approx({"8": 0.95, "0": 0.25})  # both answers of the expansion are kept
    # the roll-forward raised x = 4 (value model 0.95) and it was chosen over its siblings
    x4 = t.nodes.index(next(n for n in t.nodes if n["text"] == "<code>\nx = 4\n<end_of_step>"))
    assert t.arrays["visits"][x4] >= 2
    # roll-outs are greedy single samples and never enter the tree
    assert any(len(c) and all(len(r.path_texts) >= 1 for r in c) for c in env.propose.calls)


def test_mcts_star_selects_answers_and_backs_them_up(sandbox, grader, tiny_tokenizer):
    """ReST-MCTS*: answers compete in selection; an iteration that selects one (below the end gate) expands nothing
    and backs up from it, so every iteration is an expansion or an answer's visit."""
    env = make_env(sandbox, grader, tiny_tokenizer, ScriptedProposer(), scorer=toy_scorer("99"))  # no step hits
    cfg = mcts_star.StarSearchConfig(mode="inference", iterations=12, branch=2)
    [res] = mcts_star.search(env, [toy_problem(8)], [jax.random.key(0)], cfg)
    v = res.tree.arrays
    expanded = set(v["parent"][1:].tolist())
    answer_visits = [int(v["visits"][i]) for i, n in enumerate(res.tree.nodes) if n["kind"] == "answer_terminal"]
    assert not res.tree.meta["stopped_by_end_gate"] and v["visits"][0] == cfg.iterations
    assert sum(answer_visits) > 0 and sum(answer_visits) == cfg.iterations - len(expanded)


def toy_value_records(target: int) -> list[dict]:
    """Every path of the toy problem: value 1 for a step on the way to the right answer, 0 elsewhere."""
    records = []
    for first, x in zip(FIRST, (2, 3, 4, 5)):
        for second, out in zip(SECOND, (2 * x, x + 1)):
            code_terminal = second + observation_text(str(out))
            for answer in (out, 0):
                steps = [first, code_terminal, f"<answer>\\boxed{{{answer}}}<end_of_answer>"]
                values = [float(2 * x == target), float(out == target), float(answer == target)]
                records.append({"prompt": question_prompt(toy_problem(target)), "steps": steps, "values": values})
    return records


def test_value_model_trained_on_0_and_1_reads_them_back_in_mcts_star(sandbox, grader, tiny_tokenizer, tmp_path):
    """ReST-MCTS*'s value model (MSE on the raw output) is read as clip(raw, 0, 1): trained values of 0 and 1 come
    back as about 0 and 1 (not tanh's 0.5 and 0.88), so a right answer passes the 0.9 end gate."""
    from rstar_jax.jsonl import write_jsonl
    from rstar_jax.models.hf_io import load_model
    from rstar_jax.search.policy import RewardScorer
    from rstar_jax.train import export_checkpoint, run_training
    from train_fixtures import TINY

    records = toy_value_records(8)
    data = tmp_path / "value.jsonl"
    write_jsonl(data, records)
    run_training("value", "random", str(data), str(tmp_path / "run"),
                 [*TINY, "data.seq_len=256", "data.layout=bucket", "train.max_steps=300", "train.save_every=1000",
                  "optim.learning_rate=3e-3"])
    vm = load_model(str(export_checkpoint(tmp_path / "run", tmp_path / "vm")))
    assert vm.head.kind == "value"
    scorer = RewardScorer(vm.params, vm.cfg, vm.tokenizer, vm.head)
    env = make_env(sandbox, grader, tiny_tokenizer, ScriptedProposer(), scorer=scorer)
    cfg = mcts_star.StarSearchConfig(mode="inference", iterations=12, branch=5)
    [res] = mcts_star.search(env, [toy_problem(8)], [jax.random.key(0)], cfg)
    t = res.tree
    want = {tuple(r["steps"][: k + 1]): v for r in records for k, v in enumerate(r["values"])}
    scored = [i for i, n in enumerate(t.nodes) if n.get("score") is not None]
    assert len(scored) >= 5
    for i in scored:  # the value each node entered the tree with is the model's reading of the trained target
        path = mcts.path_texts(t.nodes, t.arrays["parent"], i)
        assert abs(float(t.arrays["first_value"][i]) - want[path]) < 0.05, (path[-1], t.arrays["first_value"][i])
    assert t.meta["stopped_by_end_gate"] and res.answer == "8"


def test_tiny_random_lm_runs_through_the_tree(sandbox, grader, tiny_tokenizer):
    cfg = ModelConfig(model_type="llama", vocab_size=420, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = prepare(init_params(cfg, jax.random.key(0), std=0.3), cfg)
    env = StepEnv(LMProposer(model, tiny_tokenizer, max_new_tokens=12), StepRunner(sandbox.run, 4),
                  tiny_tokenizer, grader, step_len=64)
    res = mcts.search(env, [toy_problem(6), toy_problem(8)], [jax.random.key(0), jax.random.key(1)],
                      mcts.MCTSConfig(rollouts=2, candidates=3))
    for r in res:
        t = r.tree
        assert 2 <= t.num_nodes <= 4  # garbage never ends a step: every candidate is an invalid leaf
        assert all(n["kind"] == "invalid" for n in t.nodes[1:])
        assert t.arrays["terminal"][0] == Tree.EXHAUSTED and r.answer is None
    assert sum(env.stats.tokens.values()) > 0 and env.stats.policy_calls == 2  # one expansion per problem
