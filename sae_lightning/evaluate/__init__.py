"""Evaluation of a trained SAE: downstream LM loss, top contexts, monosemanticity, the HTML report."""
