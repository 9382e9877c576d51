"""Monte-Carlo step labels: k completions per step prefix (run in the real sandbox), soft fractions, hard threshold."""

import collections
import dataclasses
import json

import jax
import pytest

from rstar_jax.data import Problem
from rstar_jax.config import SandboxSection
from rstar_jax.labels.mc import (MCConfig, MCJobConfig, MCLabelError, Solution, label_solution, mc_labels,
                                 run_mc_labels)
from rstar_jax.math.grading import Grader
from rstar_jax.math.steps import StepRunner, split_observation
from rstar_jax.engine import Completion
from rstar_jax.sandbox import SandboxPool
from rstar_jax.search.policy import StepEnv
from rstar_jax.search.scheduler import drive

PROBLEM = Problem("mia", "Mia has 12 dollars and earns 5. How many now?", "17", None, None, "test")
S1 = "<code>\n# Mia has 12 dollars.\nmoney = 12\n<end_of_step>"
S2 = "\n# She earns 5 more dollars.\nmoney = money + 5\n<end_of_step>"
S3 = "\n# Now print the final answer\nprint(money)\n<end_of_code>\n<output>17<end_of_output>"
S4 = "\n<answer>The answer is \\boxed{17}.<end_of_answer>"
WRONG_S2 = "\n# Now print the final answer\nprint(money)\n<end_of_code>\n<output>12<end_of_output>"
WRONG_S3 = "\n<answer>The answer is \\boxed{12}.<end_of_answer>"
BONUS = "\n# A bonus of 5 dollars.\nmoney = money + 5\n<end_of_step>"
PRINT = "\n# Now print the final answer\nprint(money)\n<end_of_code>"


class ScriptedPolicy:
    """The n-th request seen at a given path adds a bonus of 5 when n < `bonus`, else prints; after a printed
    result it boxes the printed value. So the answer depends on the code actually run in the sandbox."""

    def __init__(self, tokenizer, bonus: int):
        self.tokenizer, self.bonus = tokenizer, bonus
        self.seen = collections.Counter()
        self.calls = 0

    def __call__(self, requests, num, temperature):
        assert num == 1
        self.calls += 1
        out = []
        for r in requests:
            n = self.seen[r.path_texts]
            self.seen[r.path_texts] += 1
            _, obs = split_observation(r.path_texts[-1])
            if obs is not None:
                text = f"\n<answer>So \\boxed{{{obs}}}.<end_of_answer>"
            elif n < self.bonus and BONUS not in r.path_texts:
                text = BONUS
            else:
                text = PRINT
            out.append([Completion(text, self.tokenizer.encode(text), "stop")])
        return out


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2, timeout_s=5.0) as p:
        yield p


def _env(pool, policy, tokenizer, grader):
    return StepEnv(policy, StepRunner(pool.run, max_steps=8), tokenizer, step_len=1 << 20, grader=grader)


def test_soft_and_hard_labels_from_scripted_completions(pool, tiny_tokenizer):
    # k = 4 completions per step, 1 of them (the first seen) adds a bonus of 5:
    #   after S1 (money 12): the bonus one reaches 17, the other three print 12   -> 1/4
    #   after S2 (money 17): the bonus one reaches 22, the other three print 17   -> 3/4
    #   after S3 (printed 17): every completion boxes 17                          -> 4/4
    #   S4 is an answer (17): its own label, no completions                      -> 1
    with Grader() as grader:
        policy = ScriptedPolicy(tiny_tokenizer, bonus=1)
        env = _env(pool, policy, tiny_tokenizer, grader)
        rec = drive(env, label_solution(env, Solution(PROBLEM, (S1, S2, S3, S4)), MCConfig(k=4, threshold=2),
                                        jax.random.key(0)))
        assert rec["correct_counts"] == [1, 3, 4, 4]
        assert rec["soft_labels"] == [0.25, 0.75, 1.0, 1.0] and rec["labels"] == rec["soft_labels"]
        assert rec["hard_labels"] == [0, 1, 1, 1] and rec["first_error"] == 0
        assert policy.seen[(S1,)] == 4 and (S1, S2, S3, S4) not in policy.seen

        # a wrong solution: its answer step is labelled 0 without completions; threshold 1 = Math-Shepherd hard
        policy = ScriptedPolicy(tiny_tokenizer, bonus=1)
        env = _env(pool, policy, tiny_tokenizer, grader)
        rec = drive(env, label_solution(env, Solution(PROBLEM, (S1, WRONG_S2, WRONG_S3)), MCConfig(k=4, labels="hard"),
                                        jax.random.key(0)))
        # after S1: 1/4 as above; after the printed 12 every completion boxes 12 -> 0/4
        assert rec["correct_counts"] == [1, 0, 0]
        assert rec["hard_labels"] == [1, 0, 0] and rec["labels"] == [1.0, 0.0, 0.0] and rec["first_error"] == 1


def test_records_resume_and_are_prm_training_data(pool, tiny_tokenizer, tmp_path):
    from rstar_jax.train.data import read_records

    solutions = [Solution(PROBLEM, (S1, S2, S3, S4)), 
                 Solution(dataclasses.replace(PROBLEM, id="b"), (S1, WRONG_S2, WRONG_S3))]
    out = tmp_path / "mc.jsonl"
    with Grader() as grader:
        policy = ScriptedPolicy(tiny_tokenizer, bonus=0)
        env = _env(pool, policy, tiny_tokenizer, grader)
        first = mc_labels(env, solutions[:1], MCConfig(k=2), jax.random.key(0), out=out)
        calls = policy.calls
        both = mc_labels(env, solutions, MCConfig(k=2), jax.random.key(0), out=out)
        assert both[0] == first[0] and policy.calls > calls  # only the second solution was labelled now
        assert policy.seen[(S1,)] == 4  # 2 completions per solution, the first solution's not redone
        with pytest.raises(MCLabelError, match="do not match these solutions"):
            mc_labels(env, solutions[::-1], MCConfig(k=2), jax.random.key(0), out=out)
    recs = read_records(out, "prm")
    assert [r["labels"] for r in recs] == [[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    assert recs[0]["prompt"].startswith("<|user|>:\nMia has 12 dollars")


def test_bad_settings_are_one_line_errors():
    with pytest.raises(MCLabelError, match="1 <= threshold <= k"):
        MCConfig(k=4, threshold=5)
    with pytest.raises(MCLabelError, match="'soft' or 'hard'"):
        MCConfig(labels="both")


def test_real_tiny_policy_end_to_end(tmp_path, tiny_tokenizer):
    from rstar_jax.models.config import ModelConfig
    from rstar_jax.models.hf_io import save_causal_lm
    from rstar_jax.models.params import init_params

    cfg = ModelConfig(model_type="llama", vocab_size=420, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    folder = save_causal_lm(tmp_path / "lm", cfg, init_params(cfg, jax.random.key(0), std=0.3), tiny_tokenizer)
    src = tmp_path / "solutions.jsonl"
    src.write_text(json.dumps({"id": "mia", "question": PROBLEM.question, "answer": "17",
                               "steps": [S1, S2, S3, S4]}) + "\n")
    summary = run_mc_labels(MCJobConfig(policy=str(folder), trees=str(src), out=str(tmp_path / "mc.jsonl"),
                                        mc=MCConfig(k=2), max_new_tokens=8, sandbox=SandboxSection(workers=1)))
    [rec] = [json.loads(line) for line in (tmp_path / "mc.jsonl").read_text().splitlines()]
    assert summary["solutions"] == 1 and summary["steps"] == 4
    # random weights never finish a correct solution in 8 tokens; the answer step keeps its own label
    assert rec["correct_counts"][:3] == [0, 0, 0] and rec["correct_counts"][3] == 2 and rec["first_error"] == 0


def test_solutions_from_saved_trees(tmp_path, tiny_tokenizer):
    from rstar_jax.labels.mc import load_solutions
    from rstar_jax.math.steps import StepKind
    from rstar_jax.search import tree_io
    from rstar_jax.search.policy import Child

    b = tree_io.TreeBuilder()

    def add(parent, text, kind, answer=None, correct=None):
        return b.add(parent, Child(text, tuple(tiny_tokenizer.encode(text)), kind, answer, correct))

    s1 = add(0, S1, StepKind.INTERMEDIATE)
    w2 = add(s1, WRONG_S2, StepKind.CODE_TERMINAL)
    s2 = add(s1, S2, StepKind.INTERMEDIATE)
    add(s2, "\nprint(money\n<end_of_step>", StepKind.INVALID)
    add(w2, WRONG_S3, StepKind.ANSWER_TERMINAL, "12", False)
    s3 = add(s2, S3, StepKind.CODE_TERMINAL)
    add(s3, S4, StepKind.ANSWER_TERMINAL, "17", True)
    tree_io.save(b.build({"problem": {"id": PROBLEM.id, "question": PROBLEM.question, "answer": "17"}}),
                 tmp_path / "trees")
    sols = load_solutions(tmp_path / "trees")
    assert [s.steps for s in sols] == [(S1, WRONG_S2, WRONG_S3), (S1, S2, S3, S4)]
    assert sols[0].problem.answer == "17" and sols[0].problem.question == PROBLEM.question
    assert load_solutions(tmp_path) == sols  # a search's output folder holds its trees in trees/
    assert len(load_solutions(tmp_path / "trees", per_problem=1)) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(MCLabelError, match="no saved trees"):
        load_solutions(tmp_path / "empty")
