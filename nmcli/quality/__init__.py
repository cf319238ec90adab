"""Quality of a model, not just its compliance (methods.md §6).

- causal LMs: perplexity exp(mean next-token NLL) on held-out chunks (no special tokens added);
- encoders / sentence embedders: mean and minimum cosine between the student's and the dense teacher's mean-pooled
  embeddings of held-out paragraphs and of held-out single sentences, and the Spearman correlation of the two
  pairwise-similarity matrices (does the student keep the teacher's neighbour ranking?);
- sequence classifiers: agreement of the predicted label with the teacher's;
- image classifiers: accuracy.

Modules: agreement.py (pure tensor math), measures.py (a model on held-out samples), suite.py (per-domain quality),
text_data.py (training samples + the suite for one --data), source.py (`nmsparse eval`).
"""
