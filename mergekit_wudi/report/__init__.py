"""``mergekit-wudi-report RECIPE.yml REPORT_DIR``: a data-free report of interference.

For every tensor a WUDI recipe solves, the figures of WUDI's own loss (paper
Eq. 21) at task arithmetic, at the average and at the configured solution, per
expert, with plots; no data, one tensor at a time.

- ``figures``: the per-tensor math (torch only);
- ``binding``: the recipe read, planned and loaded by mergekit, and the WUDI
  kernel's rules applied to each tensor;
- ``render``: ``report.json``, the PNG plots, ``report.html``, the terminal summary;
- ``cli``: the console script.
"""
