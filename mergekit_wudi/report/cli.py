"""The console script ``mergekit-wudi-report RECIPE.yml REPORT_DIR``."""

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict

import click
import tqdm

from mergekit.options import OPTION_HELP, MergeOptions
from mergekit_wudi.atomic import write_atomically

JSON_NAME = "report.json"
HTML_NAME = "report.html"


def versions() -> Dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("mergekit-wudi", "mergekit", "torch", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


@click.command("mergekit-wudi-report")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("report_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--no-solve", is_flag=True,
              help="Skip the configured solver: figures at the base, the sum and the average only")
@click.option("--cuda", is_flag=True, help=OPTION_HELP["cuda"])
@click.option("--device", default=None, help=OPTION_HELP["device"])
@click.option("--lora-merge-cache", default=None, help=OPTION_HELP["lora_merge_cache"])
@click.option("--lora-merge-dtype", default=None, help=OPTION_HELP["lora_merge_dtype"])
@click.option("--transformers-cache", default=None, help=OPTION_HELP["transformers_cache"])
@click.option("--trust-remote-code", is_flag=True, help=OPTION_HELP["trust_remote_code"])
@click.option("--lazy-unpickle", is_flag=True, help=OPTION_HELP["lazy_unpickle"])
@click.option("--allow-crimes", is_flag=True, help=OPTION_HELP["allow_crimes"])
@click.option("--num-threads", "-j", type=int, default=None, help=OPTION_HELP["num_threads"])
@click.option("--quiet", is_flag=True, help="No progress bar and no summary")
@click.option("-v", "verbosity", count=True, help=OPTION_HELP["verbosity"])
def main(recipe: Path, report_dir: Path, no_solve: bool, quiet: bool, **merge_options) -> None:
    """Report how much a WUDI recipe's experts interfere, per tensor, with and without WUDI.

    Reads RECIPE.yml as mergekit-yaml does (same models, filters, parameters and
    LoRA handling; pass the same --lora-merge-cache), computes WUDI's loss
    (paper Eq. 21) for every tensor WUDI would solve, one tensor at a time, and
    writes report.json, report.html and PNG plots to REPORT_DIR. No data needed.
    """
    from mergekit_wudi.report import binding, render

    missing = render.missing_plot_dependency()
    if missing:
        raise click.ClickException(missing)
    options = MergeOptions(quiet=quiet, **merge_options)
    options.apply_global_options()
    try:
        config, source = binding.read_recipe(recipe)
        experts = [str(model) for model in binding.expert_models(config)]
        tasks = binding.plan_report(config, options, run_solver=not no_solve)
        tensors = list(binding.run_report(
            tasks, options,
            progress=lambda results, total: tqdm.tqdm(
                results, total=total, desc="Interference", unit="tensor", disable=quiet),
        ))
    except (ValueError, TypeError, RuntimeError) as error:
        if options.verbosity:
            raise  # -v: the whole traceback
        raise click.ClickException(f"{recipe}: {error}") from error
    report = render.build_report(
        tensors, experts,
        recipe={"path": str(recipe), "text": source},
        options={"solve": not no_solve, "device": options.device,
                 "lora_merge_cache": options.lora_merge_cache,
                 "lora_merge_dtype": options.lora_merge_dtype},
        versions=versions(),
    )
    images = render.plots(report)
    report_dir.mkdir(parents=True, exist_ok=True)
    outputs = {JSON_NAME: (json.dumps(report, indent=1, allow_nan=False) + "\n").encode(),
               HTML_NAME: render.report_html(report, images).encode(), **images}
    for name, data in outputs.items():
        write_atomically(report_dir / name, lambda partial, data=data: partial.write_bytes(data))
    if not quiet:
        click.echo(render.summary_text(report))
        click.echo(f"Wrote {', '.join(outputs)} to {report_dir}")

