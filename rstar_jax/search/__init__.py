"""Tree search over reasoning steps: tree arrays and their jitted operations (tree.py, tree_star.py), the MCTS
drivers and the baselines."""
