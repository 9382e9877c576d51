"""Baselines on the toy environment (scripted policy and reward model, real sandbox): greedy, maj@k, Best-of-N
with each aggregation, step-level beam search; budgets and picks checked exactly."""

import jax
import pytest

from rstar_jax.math.steps import StepRunner
from rstar_jax.search import baselines
from rstar_jax.search.mcts import SearchConfigError
from rstar_jax.search.policy import StepEnv
from search_fixtures import ScriptedProposer, grader, sandbox, toy_problem, toy_scorer  # noqa: F401 (fixtures)


def run(sandbox, grader, tokenizer, cfg, problems, scorer=None, seed=0, shuffle=True):
    env = StepEnv(ScriptedProposer(shuffle=shuffle), StepRunner(sandbox.run, 6), tokenizer, grader, step_len=96,
                  scorer=scorer)
    keys = [jax.random.fold_in(jax.random.key(seed), i) for i in range(len(problems))]
    return env, baselines.search(env, problems, keys, baselines.BaselineConfig(**cfg), meta={})


def chain_answers(saved):
    return [n["answer"] for n in saved.nodes if n.get("kind") == "answer_terminal"]


def test_greedy_is_one_chain_of_first_candidates(sandbox, grader, tiny_tokenizer):
    env, [res] = run(sandbox, grader, tiny_tokenizer, {"method": "greedy"}, [toy_problem(4)], shuffle=False)
    # x = 2 -> print(x * 2) -> boxed 4: three steps, one chain, no branching
    assert res.tree.num_nodes == 4 and res.tree.arrays["parent"].tolist() == [-1, 0, 1, 2]
    assert res.answer == "4" and res.solved is True
    assert env.stats.policy_calls == 3 and [len(c) for c in env.propose.calls] == [1, 1, 1]


def test_majority_vote_over_sampled_chains(sandbox, grader, tiny_tokenizer):
    problems = [toy_problem(6), toy_problem(8)]
    env, res = run(sandbox, grader, tiny_tokenizer, {"method": "maj", "samples": 8}, problems, seed=1)
    for r in res:
        answers = [a for a in chain_answers(r.tree)]
        # 8 chains from the root, each ends in one answer or an invalid step; the pick is the most common answer
        assert sum(1 for p in r.tree.arrays["parent"] if p == 0) == 8
        counts = {a: answers.count(a) for a in answers}
        assert counts[r.answer] == max(counts.values())
    # a problem's 8 chains advance together: one expansion per step for all its live chains
    assert env.stats.policy_calls <= 6 and len(env.propose.calls[0]) == 8


@pytest.mark.parametrize("aggregation", ["min", "product", "last"])
def test_best_of_n_ranks_chains_by_reward(sandbox, grader, tiny_tokenizer, aggregation):
    cfg = {"method": "bon", "samples": 8, "aggregation": aggregation}
    _, [res] = run(sandbox, grader, tiny_tokenizer, cfg, [toy_problem(10)], scorer=toy_scorer("10"), seed=9)
    answers = chain_answers(res.tree)
    # the right chain is sampled but is not the most common one; the reward model prefers it under every aggregation
    assert "10" in answers and max(answers, key=answers.count) != "10"
    assert res.answer == "10"
    with pytest.raises(SearchConfigError, match="needs a reward model"):
        run(sandbox, grader, tiny_tokenizer, cfg, [toy_problem(10)])


def test_beam_search_keeps_the_best_partial_solutions(sandbox, grader, tiny_tokenizer):
    cfg = {"method": "beam", "samples": 2, "candidates": 5}
    env, [res] = run(sandbox, grader, tiny_tokenizer, cfg, [toy_problem(10)], scorer=toy_scorer("10"))
    assert res.answer == "10" and res.solved
    # step 1 proposes 5 first steps from the root; only 2 beams survive and are expanded next
    assert [len(c) for c in env.propose.calls][:2] == [1, 2]
    roots = [i for i, p in enumerate(res.tree.arrays["parent"]) if p == 0]
    expanded = {int(p) for p in res.tree.arrays["parent"][1:] if p in roots}
    assert len(expanded) == 2 and any("x = 5" in res.tree.nodes[i]["text"] for i in expanded)


def test_bad_baseline_settings():
    with pytest.raises(SearchConfigError, match="aggregation 'max'"):
        baselines.BaselineConfig(method="bon", aggregation="max")
    with pytest.raises(SearchConfigError, match="samples=0"):
        baselines.BaselineConfig(method="maj", samples=0)
