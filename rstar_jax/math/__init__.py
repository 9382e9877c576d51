"""Step format (code-augmented CoT) and answer grading."""
