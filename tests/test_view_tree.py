"""Saved trees round-trip, and `view-tree` renders one self-contained HTML page (checked in headless Chromium)."""

import shutil
import subprocess

import jax
import numpy as np
import pytest

from rstar_jax.jsonl import InputError
from rstar_jax.math.grading import Grader
from rstar_jax.math.steps import StepRunner
from rstar_jax.search import mcts, tree_io
from rstar_jax.search.policy import StepEnv
from rstar_jax.search.view import render, write_html
from search_fixtures import ScriptedProposer, toy_problem


@pytest.fixture(scope="module")
def tree_file(tmp_path_factory):
    from conftest import build_tiny_tokenizer
    from rstar_jax.sandbox import SandboxPool

    with SandboxPool(workers=2, allow_insecure=True) as pool, Grader() as grader:
        env = StepEnv(ScriptedProposer(), StepRunner(pool.run, 6), build_tiny_tokenizer(), grader, step_len=96)
        [res] = mcts.search(env, [toy_problem(6, "toy/6 <b>")], [jax.random.key(0)],
                            mcts.MCTSConfig(rollouts=3, candidates=5))
    path = tree_io.save(res.tree, tmp_path_factory.mktemp("trees"))
    return path, res.tree


def test_saved_tree_round_trips(tree_file):
    path, tree = tree_file
    assert path.name.startswith("toy_6__b_-") and path.with_suffix(".npz").is_file()
    back = tree_io.load(path)
    assert back.nodes == tree.nodes and back.meta == tree.meta
    for k, v in tree.arrays.items():
        np.testing.assert_array_equal(back.arrays[k], v)
        assert back.arrays[k].dtype == tree_io.ARRAYS[k]
    kids = back.children()
    assert sum(map(len, kids)) == back.num_nodes - 1 and all(back.arrays["parent"][c] == i
                                                             for i, cs in enumerate(kids) for c in cs)


def test_bad_tree_files_are_one_line_errors(tmp_path, tree_file):
    with pytest.raises(InputError, match="no such tree file"):
        tree_io.load(tmp_path / "missing.json")
    (tmp_path / "t.json").write_text('{"format": "rstar-jax-tree", "version": 99}')
    with pytest.raises(InputError, match="version 99"):
        tree_io.load(tmp_path / "t.json")
    path, _ = tree_file
    shutil.copy(path, tmp_path / path.name)
    with pytest.raises(InputError, match="arrays file .* is missing"):
        tree_io.load(tmp_path / path.name)


def test_html_shows_every_node_and_escapes_text(tree_file):
    path, tree = tree_file
    page = render(tree_io.load(path))
    assert page.count("<details") == tree.num_nodes  # root + one box per node
    assert "&lt;end_of_step&gt;" in page and "<end_of_step>" not in page  # step text is escaped
    assert "toy/6 &lt;b&gt;" in page and "<script" not in page and "http" not in page  # self-contained
    assert "✓ correct" in page and "✗ wrong" in page and "ZeroDivisionError" in page
    assert "output: 6" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless chromium not installed")
def test_html_renders_in_headless_chromium(tree_file, tmp_path):
    path, _ = tree_file
    html = write_html(path, tmp_path / "tree.html")
    shot = tmp_path / "tree.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--window-size=1200,900", f"--screenshot={shot}", html.as_uri()],
                   check=True, capture_output=True, timeout=120)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # a real page, not an empty one
    # the page's colours made it to the screen: the green of a correct answer's border (#2a9d3a)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - [0x2A, 0x9D, 0x3A]).sum(1) < 30).sum() > 50
