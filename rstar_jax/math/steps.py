"""rStar-Math's code-augmented CoT step format: parse, assemble, execute, classify, prompt.

A trajectory, as the policy sees and writes it (the tags are rStar-Math's, byte for byte):

    <|user|>:\\n{question}\\n<|assistant|>: Let's think step by step and solve the problem with code.
    <code>\\n# comment\\npython...\\n<end_of_step>          <- intermediate step (written by the policy)
    \\n# comment\\npython...\\n<end_of_step>
    \\n# Now print the final answer\\nprint(x)\\n<end_of_code> <- code terminal: the program is complete
    \\n<output>12<end_of_output>                          <- observation, inserted by the system
    \\n<answer>... \\boxed{12}<end_of_answer>              <- answer terminal

Every step re-runs the whole program of its `<code>` block (all earlier steps' code plus its own),
as rStar-Math does; a program that does not finish with status "ok" makes the step invalid. The
status comes from the sandbox's structured result, never from searching the output for "error".

Tree nodes store `StepOutcome.text`: the step as written, plus the rendered observation for a code
terminal. Joining the texts along a root-to-node path gives the partial solution; `node_program`
recovers the open block's program from those texts, so saved trees need no extra fields.

Prefix cache: the sandbox runs each program in a fresh process, so interpreter state cannot be
kept between steps; what can be saved is running a program whose outcome is already known.
`StepRunner` keys every executed program by its syntax tree (`ast.dump`, which ignores comments,
blank lines and formatting) and skips execution on a hit. This catches what sibling sampling
produces in practice: identical candidates, candidates that differ only in comments or spacing,
and comment-only steps (whose program is the parent's, already run when the parent was expanded).
Programs that do not parse are keyed by their text. Infrastructure failures (crashed worker,
sandbox error) are not cached, so they are retried the next time.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import hashlib
import math
import re
from collections import OrderedDict
from typing import Callable, Protocol, Sequence

from rstar_jax.math.grading import last_boxed

CODE = "<code>"
STEP_END = "<end_of_step>"
CODE_END = "<end_of_code>"
OUTPUT = "<output>"
OUTPUT_END = "<end_of_output>"
ANSWER = "<answer>"
ANSWER_END = "<end_of_answer>"
STOP_STRINGS = (STEP_END, CODE_END, ANSWER_END)  # the sampler stops after any of these
PROMPT_TEMPLATE = "<|user|>:\n{question}\n<|assistant|>: Let's think step by step and solve the problem with code."
FINAL_CODE_COMMENT = "# Now print the final answer"
MAX_OUTPUT_CHARS = 1024  # rStar-Math's observation length budget

_CACHED_STATUSES = frozenset({"ok", "error", "timeout", "memory", "exit"})


class StepFormatError(ValueError):
    """A stored solution that is not in the step format (message names what is wrong)."""


class StepKind(str, enum.Enum):
    INTERMEDIATE = "intermediate"  # code step that ran; the search continues below it
    CODE_TERMINAL = "code_terminal"  # last code step; ran and printed; observation inserted
    ANSWER_TERMINAL = "answer_terminal"  # `\boxed{}` answer extracted; leaf
    INVALID = "invalid"  # malformed, program failed, or too many steps; leaf


class ExecResultLike(Protocol):
    """The fields of `rstar_jax.sandbox.ExecResult` this module reads."""

    status: str
    stdout: str
    error_type: str | None
    error_message: str | None


RunPrograms = Callable[[list[str]], Sequence[ExecResultLike]]


@dataclasses.dataclass(frozen=True)
class ParsedStep:
    kind: StepKind  # what the text claims to be (INVALID when malformed)
    text: str  # the step exactly as written
    code: str = ""  # Python contributed by a code step (tags removed)
    answer: str | None = None  # boxed content of an answer step
    error: str = ""  # why the text is malformed


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    kind: StepKind
    text: str  # what the tree node stores (code terminal: step + rendered observation)
    program: str = ""  # the program this step ran ("" for answer / malformed steps)
    answer: str | None = None  # ANSWER_TERMINAL only
    observation: str | None = None  # rendered stdout (code terminal) or "Type: message" of a failure
    reason: str = ""  # INVALID only: one line saying why
    result: ExecResultLike | None = None  # the sandbox result behind this outcome, if code ran

    @property
    def terminal(self) -> bool:
        return self.kind in (StepKind.ANSWER_TERMINAL, StepKind.INVALID)


# --------------------------------------------------------------------------------------------
# Parsing and rendering


def parse_step(text: str) -> ParsedStep:
    """Parse one generated step (including the stop string that ended it)."""
    for tag in (OUTPUT, OUTPUT_END):
        if tag in text:
            return ParsedStep(StepKind.INVALID, text, error=f"step writes the system-only tag {tag}")
    body = text.rstrip()
    for terminator, kind in ((STEP_END, StepKind.INTERMEDIATE), (CODE_END, StepKind.CODE_TERMINAL)):
        if body.endswith(terminator):
            return _parse_code_step(text, body[: -len(terminator)], kind)
    if body.endswith(ANSWER_END) or last_boxed(text) is not None:  # EOS right after the box is fine
        answer = last_boxed(text)
        if answer is None:
            return ParsedStep(StepKind.INVALID, text, error="answer step has no \\boxed{} answer")
        return ParsedStep(StepKind.ANSWER_TERMINAL, text, answer=answer)
    return ParsedStep(StepKind.INVALID, text, error="step has no terminator (generation cut off?)")


def _parse_code_step(text: str, body: str, kind: StepKind) -> ParsedStep:
    for tag in (STEP_END, CODE_END, ANSWER, ANSWER_END):
        if tag in body:
            return ParsedStep(StepKind.INVALID, text, error=f"step contains a second tag {tag}")
    stripped = body.lstrip()
    if stripped.startswith(CODE):
        stripped = stripped[len(CODE):]
    if CODE in stripped:
        return ParsedStep(StepKind.INVALID, text, error=f"{CODE} inside a step")
    code = stripped.strip("\n")
    if not code.strip():
        return ParsedStep(StepKind.INVALID, text, error="empty code step")
    return ParsedStep(kind, text, code=code)


def render_observation(stdout: str, max_chars: int = MAX_OUTPUT_CHARS) -> str:
    """rStar-Math's observation text: a lone float printed with more than 4 decimals is rounded to 4,
    output longer than `max_chars` keeps its first and last `max_chars // 2` characters around "...".

    Unlike rStar-Math, integers and non-finite values are never rewritten (it turned a printed
    400-digit integer into "inf")."""
    text = stdout
    if re.fullmatch(r"\s*[-+]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][-+]?\d+)\s*", text):
        value = float(text)
        rounded = f"{round(value, 4)}\n"
        if math.isfinite(value) and len(rounded) <= len(text):
            text = rounded
    if len(text) > max_chars:
        text = text[: max_chars // 2] + "..." + text[-(max_chars // 2):]
    return text.strip()


def observation_text(observation: str) -> str:
    """What the system appends after a code terminal."""
    return f"\n{OUTPUT}{observation}{OUTPUT_END}"


def split_observation(node_text: str) -> tuple[str, str | None]:
    """A node text -> (the step as generated, the inserted observation or None)."""
    m = re.search(re.escape("\n" + OUTPUT) + r"(.*?)" + re.escape(OUTPUT_END) + r"\s*$", node_text, flags=re.DOTALL)
    if m is None:
        return node_text, None
    return node_text[: m.start()], m.group(1)


def assemble_program(codes: Sequence[str]) -> str:
    return "\n".join(codes) + "\n" if codes else ""


def node_program(path_texts: Sequence[str]) -> str:
    """Program of the open `<code>` block along a root-to-node path of node texts.

    A code terminal closes its block: code written after it starts a fresh program, as in rStar-Math.
    """
    codes: list[str] = []
    for node_text in path_texts:
        parsed = parse_step(split_observation(node_text)[0])
        if parsed.kind == StepKind.CODE_TERMINAL:
            codes = []
        elif parsed.kind == StepKind.INTERMEDIATE:
            codes.append(parsed.code)
    return assemble_program(codes)


def build_prompt(question: str, path_texts: Sequence[str] = (), few_shot: str = "") -> str:
    """The policy's input for a node: few-shot demonstrations, the question, the steps so far."""
    return few_shot + PROMPT_TEMPLATE.format(question=question.strip()) + "".join(path_texts)


def few_shot_prefix(examples: Sequence[tuple[str, str]]) -> str:
    """Demonstrations (question, complete step-format solution) rendered exactly like a prompt."""
    return "".join(build_prompt(q, [solution]) + "\n\n" for q, solution in examples)


def split_solution(solution: str) -> list[str]:
    """A complete step-format solution -> the step texts a policy would generate (observations
    removed; the system re-inserts them). Raises StepFormatError on text after the last step."""
    parts = re.split("(" + "|".join(map(re.escape, STOP_STRINGS)) + ")", solution)
    leading_observation = re.compile(r"^\n" + re.escape(OUTPUT) + r".*?" + re.escape(OUTPUT_END), flags=re.DOTALL)
    steps: list[str] = []
    for i in range(0, len(parts) - 1, 2):
        body = leading_observation.sub("", parts[i]) if i and parts[i - 1] == CODE_END else parts[i]
        steps.append(body + parts[i + 1])
    tail = leading_observation.sub("", parts[-1]) if len(parts) > 1 and parts[-2] == CODE_END else parts[-1]
    if tail.strip():
        raise StepFormatError(f"solution: text after the last step terminator: {tail.strip()[:60]!r}")
    return steps


# --------------------------------------------------------------------------------------------
# Classification


def _failure_line(result: ExecResultLike) -> str:
    if result.error_type:
        return f"{result.error_type}: {result.error_message or ''}".strip()
    return f"program ended with status {result.status}"


def classify(parsed: ParsedStep, depth: int, max_steps: int, program: str = "",
             result: ExecResultLike | None = None, max_output_chars: int = MAX_OUTPUT_CHARS) -> StepOutcome:
    """Outcome of a parsed step at `depth` (1 = first step) given its program's sandbox result.

    A non-answer step needs room for at least one more step, so it is invalid at depth >= max_steps.
    """
    if parsed.kind == StepKind.INVALID:
        return StepOutcome(StepKind.INVALID, parsed.text, reason=parsed.error)
    if parsed.kind == StepKind.ANSWER_TERMINAL:
        if depth > max_steps:
            return StepOutcome(StepKind.INVALID, parsed.text, reason=f"too many steps ({depth} > {max_steps})")
        return StepOutcome(StepKind.ANSWER_TERMINAL, parsed.text, answer=parsed.answer)
    if result is None:
        raise ValueError("classify: a code step needs its program's sandbox result")
    if result.status != "ok":
        failure = _failure_line(result)
        return StepOutcome(StepKind.INVALID, parsed.text, program, observation=failure,
                           reason=f"program {result.status}: {failure}", result=result)
    if depth >= max_steps:
        return StepOutcome(StepKind.INVALID, parsed.text, program, reason=f"too many steps ({depth} >= {max_steps})",
                           result=result)
    if parsed.kind == StepKind.INTERMEDIATE:
        return StepOutcome(StepKind.INTERMEDIATE, parsed.text, program, result=result)
    observation = render_observation(result.stdout, max_output_chars)
    if not observation:
        return StepOutcome(StepKind.INVALID, parsed.text, program, reason="final code printed nothing", result=result)
    return StepOutcome(StepKind.CODE_TERMINAL, parsed.text + observation_text(observation), program,
                       observation=observation, result=result)


# --------------------------------------------------------------------------------------------
# Batched, cached execution


def program_key(program: str) -> str:
    """Cache key: the syntax tree when the program parses (comments/formatting do not matter)."""
    try:
        canon = "ast\0" + ast.dump(ast.parse(program))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        canon = "raw\0" + program
    return hashlib.sha256(canon.encode("utf-8", "surrogatepass")).hexdigest()


@dataclasses.dataclass
class CacheStats:
    requested: int = 0  # programs asked for
    executed: int = 0  # programs actually sent to the sandbox


class StepRunner:
    """Turns candidate step texts into `StepOutcome`s, running all their programs in one batch.

    `run_programs(codes) -> results` is the sandbox (`SandboxPool(...).run`); results are cached by
    `program_key` (LRU, `cache_size` entries) so repeated programs never run twice.
    """

    def __init__(self, run_programs: RunPrograms, max_steps: int = 16, max_output_chars: int = MAX_OUTPUT_CHARS,
                 cache_size: int = 65536):
        if max_steps < 1:
            raise ValueError(f"max_steps: must be >= 1, got {max_steps}")
        self._run_programs = run_programs
        self.max_steps = max_steps
        self.max_output_chars = max_output_chars
        self._cache: OrderedDict[str, ExecResultLike] = OrderedDict()
        self._cache_size = cache_size
        self.stats = CacheStats()

    def run(self, programs: Sequence[str]) -> list[ExecResultLike]:
        """Results for `programs`, executing only those not seen before (each distinct one once)."""
        keys = [program_key(p) for p in programs]
        missing: dict[str, str] = {}
        for key, program in zip(keys, programs):
            if key not in self._cache and key not in missing:
                missing[key] = program
        fresh = dict(zip(missing, self._run_programs(list(missing.values())))) if missing else {}
        self.stats.requested += len(programs)
        self.stats.executed += len(missing)
        for key, result in fresh.items():
            if result.status in _CACHED_STATUSES:
                self._cache[key] = result
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        out = []
        for key in keys:
            if key in fresh:
                out.append(fresh[key])
            else:
                self._cache.move_to_end(key)
                out.append(self._cache[key])
        return out

    def expand(self, requests: Sequence[tuple[Sequence[str], Sequence[str]]]) -> list[list[StepOutcome]]:
        """For each (path_texts of a node, candidate step texts): the candidates' outcomes as children."""
        parsed = [[parse_step(c) for c in cands] for _, cands in requests]
        programs: list[str] = []
        for (path, _), steps in zip(requests, parsed):
            prefix = node_program(path)
            for step in steps:
                if step.kind in (StepKind.INTERMEDIATE, StepKind.CODE_TERMINAL):
                    programs.append(prefix + step.code + "\n")
        results = iter(self.run(programs))
        programs_iter = iter(programs)
        out = []
        for (path, _), steps in zip(requests, parsed):
            depth = len(path) + 1
            row = []
            for step in steps:
                if step.kind in (StepKind.INTERMEDIATE, StepKind.CODE_TERMINAL):
                    row.append(classify(step, depth, self.max_steps, next(programs_iter), next(results),
                                        self.max_output_chars))
                else:
                    row.append(classify(step, depth, self.max_steps))
            out.append(row)
        return out


def replay_solutions(runner: StepRunner, solutions: Sequence[str]) -> list[list[StepOutcome]]:
    """Re-run stored step-format solutions step by step, exactly as the search would grow them (all
    solutions advance together, one sandbox batch per depth). A replay stops at its first terminal
    outcome; for a sound solution the texts of its outcomes join back to the solution."""
    pending = [split_solution(s) for s in solutions]
    outcomes: list[list[StepOutcome]] = [[] for _ in solutions]
    for depth in range(max(map(len, pending), default=0)):
        live = [i for i, steps in enumerate(pending)
                if depth < len(steps) and not (outcomes[i] and outcomes[i][-1].terminal)]
        expanded = runner.expand([([o.text for o in outcomes[i]], [pending[i][depth]]) for i in live])
        for i, [outcome] in zip(live, expanded):
            outcomes[i].append(outcome)
    return outcomes
