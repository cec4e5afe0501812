"""``python -m mergekit_wudi.report RECIPE.yml REPORT_DIR``."""

from mergekit_wudi.report.cli import main

main()
