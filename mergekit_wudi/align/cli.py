"""``mergekit-wudi-align REFERENCE MODEL [MODEL ...] --calibration FILE ... --out OUT_DIR``:
permute each MODEL's hidden units into REFERENCE's order (MuDSC) and write a mergekit
recipe that averages them.

Everything is checked before anything is written; the output is built in a
temporary directory beside OUT_DIR and renamed into place at the end.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import List

import torch

from .matching import match
from .permute import permute_model
from .statistics import activation_correlations
from .structure import UnsupportedModel, read_structure


class AlignError(ValueError):
    """Bad input, with a message naming what is wrong."""


def read_calibration(paths: List[Path]) -> List[str]:
    """Non-blank lines of every file (one document a line); an empty file is an error."""
    documents = []
    for path in paths:
        if not path.is_file():
            raise AlignError(f"calibration file {path} does not exist")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise AlignError(f"calibration file {path} is empty")
        documents += lines
    return documents


def tokenize(tokenizer, documents: List[str], max_tokens: int, max_length: int) -> List[torch.Tensor]:
    """Token ids of the documents, each cut to ``max_length``, ``max_tokens`` in all."""
    tokenized, total = [], 0
    for document in documents:
        ids = tokenizer(document, truncation=True, max_length=max_length)["input_ids"][: max_tokens - total]
        if ids:
            tokenized.append(torch.tensor(ids, dtype=torch.long))
            total += len(ids)
        if total >= max_tokens:
            break
    return tokenized


def _load(path: Path, role: str):
    """(config, model, tokenizer) of one model directory, or AlignError naming it."""
    import transformers

    if not (path / "config.json").is_file():
        raise AlignError(f"{role} {path}: no config.json (not a model directory)")
    config = transformers.AutoConfig.from_pretrained(path)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise AlignError(f"{role} {path}: architecture {architecture} is not a transformers model class")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise AlignError(f"{role} {path}: no usable tokenizer ({error})") from None
    model = model_class.from_pretrained(path, dtype="auto").eval()
    return config, model, tokenizer


def _shapes(model) -> dict:
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_models(reference_path: Path, paths: List[Path]):
    """Load everything and check it fits together; returns (structure, loaded)."""
    loaded = [_load(reference_path, "REFERENCE")] + [_load(path, f"MODEL {path}") for path in paths]
    config, model, _ = loaded[0]
    try:
        structure = read_structure(config, _shapes(model))
    except UnsupportedModel as error:
        raise AlignError(f"REFERENCE {reference_path}: {error}") from None
    architecture, shapes = config.architectures, _shapes(model)
    for path, (other_config, other, _) in zip(paths, loaded[1:]):
        if other_config.architectures != architecture or other_config.model_type != config.model_type:
            raise AlignError(
                f"MODEL {path}: architecture {other_config.architectures} differs from REFERENCE's {architecture}"
            )
        other_shapes = _shapes(other)
        for name in sorted(set(shapes) | set(other_shapes)):
            if shapes.get(name) != other_shapes.get(name):
                raise AlignError(
                    f"MODEL {path}: parameter {name} has shape {other_shapes.get(name)}, REFERENCE has {shapes.get(name)}"
                )
    return structure, loaded


def recipe(reference: Path, aligned: List[Path], family: str, dtype: str) -> str:
    """The merge.yml text: the plain average of REFERENCE and the aligned models."""
    if family == "bert":
        # mergekit-yaml 0.1.5 crashes on BERT checkpoints (its bert.json); mergekit-pytorch
        # merges the raw state dicts.
        head = ("# mergekit-pytorch OUT_DIR/merge.yml MERGED  (mergekit-yaml 0.1.5 crashes on BERT),\n"
                f"# then copy config.json and the tokenizer files from {reference} into MERGED.\n")
        paths = [reference / "model.safetensors"] + [path / "model.safetensors" for path in aligned]
    else:
        head = "# mergekit-yaml OUT_DIR/merge.yml MERGED\n"
        paths = [reference, *aligned]
    models = "".join(f"  - model: {path}\n    parameters:\n      weight: 1.0\n" for path in paths)
    return (f"# Written by mergekit-wudi-align: the average of {reference} and the models aligned to it.\n"
            f"{head}merge_method: linear\ndtype: {dtype}\nmodels:\n{models}")


def _dtype_name(config) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return str(dtype).replace("torch.", "")


def align(args) -> Path:
    from tqdm import tqdm

    out = Path(args.out).absolute()
    if out.exists() and any(out.iterdir()):
        raise AlignError(f"--out {out} exists and is not empty")
    documents = read_calibration([Path(p) for p in args.calibration])
    reference_path = Path(args.reference).absolute()
    paths = [Path(p).absolute() for p in args.models]
    structure, loaded = check_models(reference_path, paths)
    config, reference, tokenizer = loaded[0]
    if structure.family == "bert" and not (reference_path / "model.safetensors").is_file():
        raise AlignError(f"REFERENCE {reference_path}: the BERT recipe (mergekit-pytorch) needs one model.safetensors")
    max_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    tokens = tokenize(tokenizer, documents, args.max_tokens, max_length)
    if not tokens:
        raise AlignError("the calibration files hold no tokens after tokenisation")
    device = torch.device("cuda" if args.cuda else args.device)
    for _, model, _ in loaded:
        model.to(device)
    correlations = activation_correlations(
        reference, [model for _, model, _ in loaded[1:]], structure.statistics,
        tqdm(tokens, desc="calibration", unit="document"), device,
    )
    reference_state = reference.state_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        aligned = []
        for number, ((_, model, model_tokenizer), path) in enumerate(zip(loaded[1:], paths), 1):
            permutations, score = match(
                structure, reference_state, model.state_dict(), correlations[number - 1], args.alpha,
                seed=args.seed, progress=tqdm,
            )
            permute_model(structure, model, permutations)
            print(f"{path}: mean matched similarity {score:.4f}", file=sys.stderr)
            model.save_pretrained(staging / f"model-{number}")
            model_tokenizer.save_pretrained(staging / f"model-{number}")
            aligned.append(out / f"model-{number}")
        (staging / "merge.yml").write_text(recipe(reference_path, aligned, structure.family, _dtype_name(config)))
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergekit-wudi-align",
        description="Permute each MODEL's hidden units into REFERENCE's order (MuDSC; the function is "
                    "unchanged) and write OUT_DIR/merge.yml, a mergekit recipe averaging them.",
    )
    p.add_argument("reference", metavar="REFERENCE", help="model directory whose unit order the others take")
    p.add_argument("models", metavar="MODEL", nargs="+", help="model directories to align to REFERENCE")
    p.add_argument("--calibration", nargs="+", required=True, metavar="FILE",
                   help="plain-text files, one document a line, tokenised with REFERENCE's tokenizer")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="where model-1/, model-2/, ... and merge.yml go")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight-space share of the similarity (default 0.5; 0: activation matching; 1: weight "
                        "similarity only, from the activation matching start)")
    p.add_argument("--max-tokens", type=int, default=16384, help="calibration tokens used (default 16384)")
    p.add_argument("--device", default="cpu", help="torch device for the forward passes (default cpu)")
    p.add_argument("--cuda", action="store_true", help="same as --device cuda")
    p.add_argument("--seed", type=int, default=0, help="order of the coordinate descent's visits")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if not 0 <= args.alpha <= 1:
        parser().error(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.max_tokens < 1:
        parser().error(f"--max-tokens must be positive, got {args.max_tokens}")
    try:
        out = align(args)
    except AlignError as error:
        print(f"mergekit-wudi-align: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(out / "merge.yml")
