"""Step format: parsing, observation rendering, program assembly, classification, the prefix cache."""

import pytest

from rstar_jax.math.steps import (OUTPUT, StepFormatError, StepKind, StepRunner, build_prompt,
                                  few_shot_prefix, node_program, parse_step, render_observation, replay_solutions,
                                  split_observation, split_solution)
from rstar_jax.sandbox import SandboxPool

SOLUTION = (
    "<code>\n# Mia has 12 dollars.\nmoney = 12\n<end_of_step>"
    "\n# She earns 5 more dollars.\nmoney = money + 5\n<end_of_step>"
    "\n# Now print the final answer\nprint(money)\n<end_of_code>"
    "\n<output>17<end_of_output>"
    "\n<answer>From the result, the answer is \\boxed{17}.<end_of_answer>"
)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2, timeout_s=2.0) as p:
        yield p


class CountingRunner:
    """The real sandbox, recording which programs it was asked to execute."""

    def __init__(self, pool):
        self.pool, self.executed = pool, []

    def __call__(self, codes):
        self.executed += codes
        return self.pool.run(codes)


def test_parse_step_kinds():
    first = parse_step("<code>\n# set up\nx = 1\n<end_of_step>")
    assert (first.kind, first.code) == (StepKind.INTERMEDIATE, "# set up\nx = 1")
    last = parse_step("\n# Now print the final answer\nprint(x)\n<end_of_code>")
    assert (last.kind, last.code) == (StepKind.CODE_TERMINAL, "# Now print the final answer\nprint(x)")
    ans = parse_step("\n<answer>So it is \\boxed{\\frac{1}{2}}.<end_of_answer>")
    assert (ans.kind, ans.answer) == (StepKind.ANSWER_TERMINAL, "\\frac{1}{2}")
    assert parse_step("The answer is \\boxed{3}").kind == StepKind.ANSWER_TERMINAL  # EOS after the box
    malformed = {
        "\nx = 1\n": "no terminator",
        "\n<answer>no box<end_of_answer>": "no \\boxed",
        "\nx = 1\n<output>1<end_of_output><end_of_step>": "system-only tag <output>",
        "\nx = 1\n<end_of_step>\ny = 2\n<end_of_step>": "second tag",
        "\n  \n<end_of_step>": "empty code step",
        "\nx = 1\n<code>\ny = 2<end_of_step>": "<code> inside",
    }
    for text, why in malformed.items():
        parsed = parse_step(text)
        assert parsed.kind == StepKind.INVALID and why in parsed.error, (text, parsed.error)


def test_render_observation_like_rstar():
    assert render_observation("0.3333333333333333\n") == "0.3333"  # lone float: 4 decimals when shorter
    assert render_observation("12\n") == "12"  # "12.0" would be longer: kept
    assert render_observation("0.5\n") == "0.5"
    assert render_observation("1/3\n") == "1/3"
    assert render_observation("x = 0.123456789\ny = 2\n") == "x = 0.123456789\ny = 2"  # not a lone float
    assert render_observation("1.5e-07\n") == "0.0"  # rStar rounds scientific notation too
    assert render_observation("9" * 400 + "\n") == "9" * 400  # integers are never rewritten (rStar: "inf")
    long = "\n".join(f"{i:05d}" for i in range(500))  # 2999 chars
    out = render_observation(long + "\n")
    assert out == long[:512] + "..." + long[-511:]  # 512 head + 512 tail chars (the tail's last is the newline)


def test_prompt_and_program_assembly():
    prompt = build_prompt("What is 1+1? ", ["<code>\nx = 1\n<end_of_step>"])
    assert prompt == ("<|user|>:\nWhat is 1+1?\n<|assistant|>: Let's think step by step and solve the problem "
                      "with code.<code>\nx = 1\n<end_of_step>")
    demo = few_shot_prefix([("Q1", SOLUTION)])
    assert demo == build_prompt("Q1", [SOLUTION]) + "\n\n"
    assert build_prompt("Q2", few_shot=demo).startswith(demo)

    steps = split_solution(SOLUTION)
    assert len(steps) == 4 and OUTPUT not in "".join(steps)
    terminal = steps[2] + "\n<output>17<end_of_output>"
    assert split_observation(terminal) == (steps[2], "17")
    assert node_program(steps[:2]) == ("# Mia has 12 dollars.\nmoney = 12\n"
                                       "# She earns 5 more dollars.\nmoney = money + 5\n")
    # a code terminal closes its block: code after it starts a fresh program
    assert node_program([steps[0], terminal, "\n<code>\ny = 3\n<end_of_step>"]) == "y = 3\n"
    with pytest.raises(StepFormatError, match="after the last step"):
        split_solution(SOLUTION + "\ntrailing words")


def test_replay_reproduces_solution(pool):
    runner = StepRunner(pool.run)
    [outcomes] = replay_solutions(runner, [SOLUTION])
    assert [o.kind for o in outcomes] == [StepKind.INTERMEDIATE, StepKind.INTERMEDIATE, StepKind.CODE_TERMINAL,
                                          StepKind.ANSWER_TERMINAL]
    assert "".join(o.text for o in outcomes) == SOLUTION
    assert outcomes[2].observation == "17" and outcomes[-1].answer == "17"


def test_sibling_classification_and_prefix_cache(pool):
    run = CountingRunner(pool)
    runner = StepRunner(run, max_steps=4)
    root = "<code>\n# total\nx = 0.1 + 0.2\n<end_of_step>"
    [[parent]] = runner.expand([([], [root])])
    assert parent.kind == StepKind.INTERMEDIATE and len(run.executed) == 1
    siblings = [
        "\n# double it\ny = 2 * x\n<end_of_step>",
        "\n# double it\ny = 2 * x\n<end_of_step>",  # duplicate sample
        "\n# twice the total, same code\ny = 2*x   \n<end_of_step>",  # differs only in comment/spacing
        "\n# let me think about what to do next\n<end_of_step>",  # comment only: the parent's program
        "\n# oops\ny = x / 0\n<end_of_step>",
        '\nprint("error bound = 0.1")\n<end_of_step>',  # "error" in stdout is not a failure
        "\n# Now print the final answer\nprint(x)\n<end_of_code>",
        "\n# Now print the final answer\nz = x\n<end_of_code>",  # prints nothing
        "\nwhile True:\n    pass\n<end_of_step>",
        "\nx = (\n<end_of_step>",
        "\n<answer>\\boxed{0.3}<end_of_answer>",
        "\ny = 1",  # cut off
    ]
    [out] = runner.expand([([parent.text], siblings)])
    kinds = [o.kind for o in out]
    V, I, C, A = StepKind.INTERMEDIATE, StepKind.INVALID, StepKind.CODE_TERMINAL, StepKind.ANSWER_TERMINAL
    assert kinds == [V, V, V, V, I, V, C, I, I, I, A, I]
    assert "ZeroDivisionError" in out[4].reason and out[4].observation.startswith("ZeroDivisionError")
    assert out[6].observation == "0.3" and out[6].text.endswith("<output>0.3<end_of_output>")
    assert "printed nothing" in out[7].reason
    assert "timeout" in out[8].reason and "SyntaxError" in out[9].reason
    assert out[10].answer == "0.3" and "no terminator" in out[11].reason
    # executed once each: the root, y=2*x (3 spellings), x/0, the print, print(x), z=x, the loop, the syntax error
    assert len(run.executed) == 1 + 7 and runner.stats.requested == 1 + 10
    # a cached failure stays a failure without re-running
    [[again]] = runner.expand([([parent.text], [siblings[4]])])
    assert again.kind == I and len(run.executed) == 8

    # depth limit: a non-answer step needs room for one more step
    path = [root, siblings[0], siblings[5]]
    [[deep, deep_answer]] = runner.expand([(path, ["\nw = 1\n<end_of_step>", "\\boxed{1}"])])
    assert deep.kind == I and "too many steps" in deep.reason and deep_answer.kind == A
