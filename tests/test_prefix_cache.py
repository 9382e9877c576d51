"""The search environment's shared few-shot prefix and per-request keys with the real LM proposer: every question's
tokens start with `StepEnv.shared_prefix_ids` (also for SmolLM2's tokenizer, where BPE merges across the end of the
few-shot text), and a batched search samples exactly what each problem searched alone samples."""

import jax
import numpy as np
import pytest

from rstar_jax.data import generate as synth
from rstar_jax.math.steps import StepRunner
from rstar_jax.models.config import ModelConfig
from rstar_jax.models.params import init_params
from rstar_jax.models.registry import cache_dir
from rstar_jax.models.tokenizer import load_tokenizer
from rstar_jax.engine import prepare
from rstar_jax.search import mcts
from rstar_jax.search.job import few_shot_text
from rstar_jax.search.policy import LMProposer, StepEnv
from search_fixtures import grader, sandbox, toy_problem  # noqa: F401 (fixtures)


def smollm2_tokenizer():
    folder = cache_dir() / "models" / "smollm2-135m"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 is not in the local model cache")
    return load_tokenizer(folder)


@pytest.mark.parametrize("which, unstable", [("tiny", 0), ("smollm2", 1)])  # SmolLM2 merges the final "\n\n"
def test_every_question_starts_with_the_shared_few_shot_ids(tiny_tokenizer, which, unstable):
    tokenizer = tiny_tokenizer if which == "tiny" else smollm2_tokenizer()
    few_shot = few_shot_text("synth:levels=1-2,n=8,seed=0", 2)
    env = StepEnv(None, None, tokenizer, None, step_len=8, few_shot=few_shot)
    whole = tokenizer.encode(few_shot, add_special_tokens=True)
    assert env.shared_prefix_ids == tuple(whole[: len(whole) - unstable])
    for p in synth([1, 2, 3], 6, 0):
        ids = env.question_ids(p)
        assert ids[: len(env.shared_prefix_ids)] == env.shared_prefix_ids
        assert tokenizer.decode(list(ids)).startswith(few_shot)
    assert StepEnv(None, None, tokenizer, None, step_len=8).shared_prefix_ids == ()


def test_lm_proposer_batched_search_equals_each_problem_alone(sandbox, grader, tiny_tokenizer):
    cfg = ModelConfig(model_type="llama", vocab_size=420, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    proposer = LMProposer(prepare(init_params(cfg, jax.random.key(0), std=0.3), cfg), tiny_tokenizer,
                          max_new_tokens=8)
    few_shot = "Natalia sold clips to 48 of her friends in April.\n\n"

    def go(problems, keys):
        env = StepEnv(proposer, StepRunner(sandbox.run, 4), tiny_tokenizer, grader, step_len=64, few_shot=few_shot)
        return mcts.search(env, problems, keys, mcts.MCTSConfig(rollouts=2, candidates=3, temperature=1.0))

    problems = [toy_problem(t) for t in (6, 8, 10)]
    keys = [jax.random.key(s) for s in (3, 4, 5)]
    batched = go(problems, keys)
    for p, k, b in zip(problems, keys, batched):
        [alone] = go([p], [k])
        assert [n["text"] for n in alone.tree.nodes] == [n["text"] for n in b.tree.nodes]
        for name, arr in alone.tree.arrays.items():
            np.testing.assert_array_equal(arr, b.tree.arrays[name], err_msg=name)
    assert len({tuple(n["text"] for n in b.tree.nodes) for b in batched}) == 3  # keys and problems matter
