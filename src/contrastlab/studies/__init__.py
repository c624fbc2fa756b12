"""Studies: many runs (recipes x overrides x seeds) described by one file, run by a launcher, read back as a table.

A study drives runs through their run directories (config.yaml, results.json, eval_*.json) and ``python -m
contrastlab`` command lines; it never imports the trainer. See :mod:`contrastlab.studies.study` and docs/studies.md.
"""
