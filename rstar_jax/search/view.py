"""`rstar-jax view-tree`: one self-contained HTML page (inline CSS, no scripts, no outside links) of a saved tree.

Every node is a collapsible box (`<details>`) under its parent showing its Q value, visits, kind, the step text,
the code output or failure, and for answer terminals the answer marked correct or wrong. The header gives the
question, the gold answer and the search's pick.
"""

from __future__ import annotations

import html
from pathlib import Path

from rstar_jax.search import tree_io
from rstar_jax.search.tree import Tree

_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:18px;margin:0 0 8px} .meta{margin:4px 0 12px;font-size:14px} .meta b{display:inline-block;min-width:90px}
details{margin:4px 0 4px 18px;border-left:3px solid #bbb;padding-left:8px;background:#fff}
summary{cursor:pointer;font-size:13px;padding:2px 0}
pre{margin:2px 0 6px;padding:6px;background:#f3f3f3;white-space:pre-wrap;font-size:12px;max-width:1100px}
pre.out{background:#eef4ff} pre.err{background:#fff0f0}
.tag{display:inline-block;border-radius:3px;padding:0 5px;margin-left:6px;font-size:12px;color:#fff;background:#888}
.correct{border-left-color:#2a9d3a} .correct>summary .tag.k{background:#2a9d3a}
.wrong{border-left-color:#d33} .wrong>summary .tag.k{background:#d33}
.invalid{border-left-color:#999;opacity:.75}
.answer{border-left-color:#e0a000} .answer>summary .tag.k{background:#e0a000}
.legend span{margin-right:14px;font-size:12px}
"""


def _node_class(node: dict, correct: int, terminal: int) -> str:
    if node.get("kind") == "answer_terminal":
        return {Tree.CORRECT: "correct", Tree.WRONG: "wrong"}.get(correct, "answer")
    return "invalid" if terminal == Tree.INVALID else ""


def _label(node: dict, correct: int) -> str:
    kind = node.get("kind", "")
    if kind == "answer_terminal":
        mark = {Tree.CORRECT: " ✓ correct", Tree.WRONG: " ✗ wrong"}.get(correct, "")
        return f"answer {node.get('answer')}{mark}"
    if kind == "invalid":
        return "invalid"
    return kind.replace("_", " ")


def render(saved: tree_io.SavedTree) -> str:
    a, nodes, kids = saved.arrays, saved.nodes, saved.children()
    meta = saved.meta
    problem = meta.get("problem", {})
    esc = html.escape

    def box(i: int) -> str:
        node = nodes[i]
        correct, terminal = int(a["correct"][i]), int(a["terminal"][i])
        head = (f"#{i} · Q={float(a['value'][i]):+.3f} · N={int(a['visits'][i])}"
                f"<span class='tag k'>{esc(_label(node, correct))}</span>")
        if terminal == Tree.EXHAUSTED:
            head += "<span class='tag'>exhausted</span>"
        if node.get("score") is not None:
            head += f"<span class='tag'>RM {float(node['score']):+.3f}</span>"
        body = f"<pre>{esc(node.get('text', ''))}</pre>"
        if node.get("kind") == "invalid" and (node.get("reason") or node.get("observation")):
            body += f"<pre class='err'>{esc(node.get('reason') or node.get('observation'))}</pre>"
        elif node.get("observation"):
            body += f"<pre class='out'>output: {esc(node['observation'])}</pre>"
        inner = "".join(box(c) for c in kids[i])
        css = _node_class(node, correct, terminal)
        return f"<details open class='{css}'><summary>{head}</summary>{body}{inner}</details>"

    root_head = (f"root · Q={float(a['value'][0]):+.3f} · N={int(a['visits'][0])} · "
                 f"{saved.num_nodes} nodes")
    tree_html = f"<details open><summary>{root_head}</summary>{''.join(box(c) for c in kids[0])}</details>"
    rows = [("problem", problem.get("id")), ("question", problem.get("question")), ("gold", problem.get("answer")),
            ("answer", meta.get("answer")), ("method", f"{meta.get('method')} ({meta.get('mode')} mode)")]
    info = "".join(f"<div><b>{k}</b> {esc(str(v))}</div>" for k, v in rows)
    legend = ("<div class='legend'><span style='color:#2a9d3a'>■ correct answer</span>"
              "<span style='color:#d33'>■ wrong answer</span><span style='color:#e0a000'>■ ungraded answer</span>"
              "<span style='color:#999'>■ invalid step</span>"
              "<span>Q: mean value · N: visits · RM: reward model</span></div>")
    title = esc(f"search tree {problem.get('id', '')}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style></head>"
            f"<body><h1>{title}</h1><div class='meta'>{info}</div>{legend}{tree_html}</body></html>\n")


def write_html(tree_path: str | Path, out: str | Path) -> Path:
    """Render the tree saved at `tree_path` (its .json or .npz) into the HTML file `out`."""
    out = Path(out)
    page = render(tree_io.load(tree_path))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
