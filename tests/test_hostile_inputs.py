"""Hostile inputs: every one ends in a documented result or an error that names its cause.

The in-memory cases go through mergekit's own API (``merge_tensors``,
``merge_state_dicts``); configuration cases through ``run_merge`` in-process (so
tensor reads can be counted) or the ``mergekit-yaml`` console script.
"""

import logging
import math
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit.config import MergeConfiguration
from mergekit.io.lazy_tensor_loader import LazyTensorLoader
from mergekit.merge import run_merge
from mergekit.merge_methods.api import merge_state_dicts, merge_tensors
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file

from mergekit_wudi import solvers
from mergekit_wudi.demo import write_family
from tests.conftest import load_weights, run_console_script
from tests.oracle import (
    authors_wudi,
    eq21,
    normal_equations_wudi_cfs,
    relative_error,
    structured_task_vectors,
)

LINEAR = "model.layers.0.mlp.up_proj.weight"
IDS = ("base", "math", "code", "chat", "law")


def models(shape=(16, 12), count=3, seed=0):
    """A base and experts = base + task vectors (low rank plus noise for matrices)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator) * 0.05
    if len(shape) == 2:
        taus = structured_task_vectors(count, *shape, seed=seed + 1, scale=1e-2)
    else:
        taus = [1e-2 * torch.randn(shape, generator=generator) for _ in range(count)]
    return base, [base + tau for tau in taus]


def merge(base, experts, name=LINEAR, **parameters):
    return merge_tensors(
        [base, *experts], "wudi", base_index=0, ids=IDS[: len(experts) + 1], name=name,
        parameters=parameters,
    )


# 1. Degenerate task vectors ---------------------------------------------------------


def test_experts_that_left_the_tensor_untouched_give_the_base_bit_for_bit():
    base, _ = models()
    assert torch.equal(merge(base, [base.clone(), base.clone(), base.clone()]), base)
    _, experts = models()
    assert torch.equal(merge(base, experts, weight=0.0), base)


@pytest.mark.parametrize("name", [LINEAR, "model.layers.0.input_layernorm.weight"])
def test_untouched_or_zero_weight_experts_are_as_if_absent(name):
    shape = (16, 12) if name == LINEAR else (12,)
    base, (math_expert, _, code_expert) = models(shape)
    alone = merge(base, [math_expert, code_expert], name=name, weight=[0.5, 2.0])
    untouched = merge(base, [math_expert, base.clone(), code_expert], name=name, weight=[0.5, 1.0, 2.0])
    weightless = merge(base, [math_expert, base + 1.0, code_expert], name=name, weight=[0.5, 0.0, 2.0])
    assert torch.equal(untouched, alone) and torch.equal(weightless, alone)
    assert not torch.equal(alone, base)


def test_huge_task_vectors_keep_the_sum_since_adam_steps_are_below_their_precision():
    # Adam moves an entry by about learning_rate per step; next to entries of 1e30
    # (float64 ulp ~1e14) that is exactly nothing: the result is the sum start.
    taus = structured_task_vectors(3, 16, 12, scale=1e30)
    merged = solvers.wudi_adam(taus)
    assert merged.dtype == torch.float64
    assert torch.equal(merged, sum(tau.double() for tau in taus))


def test_tiny_task_vectors_fall_back_to_the_sum_with_a_warning(caplog):
    # Steps of learning_rate (1e-5) on entries of 1e-30 overshoot by 25 orders of
    # magnitude; Adam's final loss is above the start, so the start is kept.
    taus = structured_task_vectors(3, 16, 12, scale=1e-30)
    with caplog.at_level(logging.WARNING, logger="mergekit_wudi.solvers.adam"):
        merged = solvers.wudi_adam(taus, name="tiny.weight")
    assert torch.equal(merged, sum(tau.double() for tau in taus))
    assert "'tiny.weight'" in caplog.text and "Lower learning_rate" in caplog.text
    # Without the guard the result would be garbage: check that it really was.
    scan = solvers.scan_task_vectors(taus)
    gram, residual = solvers.gram_and_residual(taus, scan, float64_matmuls=True)
    runaway = scan.initial
    change = solvers.adam_descent(
        gram, residual, runaway, solvers.DEFAULT_ITERATIONS, solvers.DEFAULT_LEARNING_RATE
    )
    assert change > 0
    assert float(runaway.abs().max()) > 1e15 * float(merged.abs().max())


def test_ordinary_task_vectors_do_not_trigger_the_fallback(caplog):
    taus = structured_task_vectors(3, 16, 12, scale=1e-3)
    with caplog.at_level(logging.WARNING, logger="mergekit_wudi.solvers.adam"):
        merged = solvers.wudi_adam(taus, iterations=50)
    assert caplog.text == ""
    assert relative_error(merged, authors_wudi(taus, iterations=50)) < 1e-5


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_closed_form_at_extreme_magnitudes_is_eq20(scale):
    taus = structured_task_vectors(3, 16, 12, scale=scale)
    merged = solvers.wudi_closed_form(taus, omega=1e-4)
    assert torch.isfinite(merged).all()
    assert relative_error(merged, normal_equations_wudi_cfs(taus, 1e-4)) < 1e-10


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_magnitudes_through_mergekit(scale, caplog):
    # A zero base (e.g. a zero-initialised layer) keeps 1e-30 task vectors visible in
    # float32; either way the result is base + the sum of the task vectors.
    base = torch.zeros(16, 12)
    experts = [base + tau for tau in structured_task_vectors(3, 16, 12, scale=scale)]
    with caplog.at_level(logging.WARNING, logger="mergekit_wudi.solvers.adam"):
        merged = merge(base, experts)
    assert torch.equal(merged, sum(expert.double() for expert in experts).float())
    assert (LINEAR in caplog.text) == (scale < 1)


def test_task_vectors_below_the_base_precision_leave_the_base():
    base, _ = models()
    experts = [base + tau for tau in structured_task_vectors(3, 16, 12, scale=1e-30)]
    assert torch.equal(merge(base, experts), base)


def exactly_rank_one(count=3, seed=4):
    """tau_i = a_i v^T with small integers scaled by 2^-10: exact in float32."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randint(-3, 4, (1, 12), generator=generator).float()
    return [
        torch.randint(-3, 4, (16, 1), generator=generator).float() @ direction * 2**-10
        for _ in range(count)
    ]


def rank_one_cfs(taus, omega):
    """Eq. 20 by hand for tau_i = a_i v^T: tau_m = (sum tau_i + omega sum w_i tau_i) / (N + omega W)."""
    taus = [tau.double() for tau in taus]
    weights = [1 / float(tau.pow(2).sum()) for tau in taus]
    numerator = sum(taus) + omega * sum(w * tau for w, tau in zip(weights, taus))
    return numerator / (len(taus) + omega * sum(weights))


@pytest.mark.parametrize("omega,tolerance", [(1e-4, 1e-5), (1e-10, 1e-8)])
def test_closed_form_on_rank_one_task_vectors_is_exact(omega, tolerance):
    # At omega 1e-10 the ridge is 2e-7 of C's trace: float32 rounding of C would
    # decide the directions v does not span (error ~0.3), so this is solved in float64.
    taus = exactly_rank_one()
    assert relative_error(solvers.wudi_closed_form(taus, omega=omega), rank_one_cfs(taus, omega)) < tolerance


def test_rank_deficient_gram_with_a_small_ridge_is_solved_in_float64():
    # 3 experts of 6 rows in 40 columns: C has rank 18 of 40.
    taus = structured_task_vectors(3, 6, 40, seed=2)
    merged = solvers.wudi_closed_form(taus, omega=1e-8)
    assert merged.dtype == torch.float64
    assert relative_error(merged, normal_equations_wudi_cfs(taus, 1e-8)) < 1e-7


def test_a_ridge_below_float64_precision_is_an_error_naming_omega_and_tensor():
    base = torch.zeros(16, 12)
    experts = [base + tau for tau in exactly_rank_one()]
    with pytest.raises(ValueError, match=rf"tensor '{LINEAR}': parameter 'omega' = 1e-20 is too small"):
        merge(base, experts, solver="closed_form", omega=1e-20)


def test_adam_on_rank_two_task_vectors_is_the_authors_loop():
    taus = structured_task_vectors(3, 16, 12, rank=2, seed=6)
    merged = solvers.wudi_adam(taus, iterations=100)
    assert torch.isfinite(merged).all()
    assert relative_error(merged, authors_wudi(taus, iterations=100)) < 1e-5


@pytest.mark.parametrize("seed", [4, 6])
def test_adam_on_rank_one_task_vectors_is_the_authors_loop_up_to_amplified_rounding(seed):
    # For tau_i = a_i v^T the gradient is 2 (N-1) (sum_i a_i) v^T at the start, and a
    # row r with sum_i a_ir = 0 has gradient 2 tau_m[r] C: exactly zero while the row
    # is zero, so in exact arithmetic Adam never moves it. In floating point the row
    # starts with the rounding of N cancelling terms (~1e-9), below Adam's eps (1e-8),
    # where Adam is gradient descent with step lr/eps = 1e3 on curvature up to 2N = 6:
    # each step overshoots 0 thousands-fold until Adam's normalisation caps the steps
    # near lr, and the row then oscillates about 0 by about one step. Both our solver
    # and the authors' loop end with such noise in those rows, each its own (or none,
    # when the rounding happens to cancel), so they are compared elsewhere only.
    taus = exactly_rank_one(seed=seed)
    merged = solvers.wudi_adam(taus, iterations=100)
    reference = authors_wudi(taus, iterations=100)
    assert torch.isfinite(merged).all()
    still = (sum(taus) == 0).all(dim=1)
    assert still.any()  # the case under test exists in this draw
    assert relative_error(merged[~still], reference[~still]) < 1e-5
    # The oscillation's amplitude is about one step: below lr, far below the result (~1e-2).
    assert float(merged[still].abs().max()) < solvers.DEFAULT_LEARNING_RATE
    assert float(reference[still].abs().max()) < solvers.DEFAULT_LEARNING_RATE


# 2. NaN and Inf ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("culprit", [0, 2], ids=["base", "expert"])
@pytest.mark.parametrize("name", [LINEAR, "model.norm.weight"])
def test_non_finite_input_names_tensor_and_model(value, culprit, name):
    base, experts = models((16, 12) if name == LINEAR else (12,))
    tensors = [base, *experts]
    tensors[culprit] = tensors[culprit].clone()
    tensors[culprit][3] = value
    role = "base model" if culprit == 0 else "model"
    with pytest.raises(ValueError, match=rf"tensor '{name}' of {role} {IDS[culprit]} contains NaN or Inf"):
        merge(tensors[0], tensors[1:], name=name)


# 3. One expert and expert order -----------------------------------------------------


@pytest.mark.parametrize(
    "name,shape",
    [(LINEAR, (16, 12)), ("transformer.h.0.attn.c_attn.weight", (12, 36)),
     ("model.embed_tokens.weight", (32, 12)), ("model.norm.weight", (12,))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_expert_is_that_expert_bit_for_bit(name, shape, dtype):
    base, (expert,) = models(shape, count=1)
    merged = merge(base.to(dtype), [expert.to(dtype)], name=name)
    assert merged.dtype == dtype and torch.equal(merged, expert.to(dtype))


@pytest.mark.parametrize("solver_name", ["adam", "closed_form"])
def test_expert_order_does_not_matter(solver_name):
    base, experts = models(count=4)
    weights = [1.0, 0.5, 2.0, 1.5]
    order = [2, 0, 3, 1]
    merged = merge(base, experts, weight=weights, solver=solver_name)
    shuffled = merge(base, [experts[i] for i in order], weight=[weights[i] for i in order],
                     solver=solver_name)
    assert relative_error(shuffled - base, merged - base) < 1e-5


# 4. Storage dtypes --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_is_the_float32_merge_rounded_once(dtype):
    base, experts = models()
    stored = [t.to(dtype) for t in (base, *experts)]
    merged = merge(stored[0], stored[1:])
    reference = merge(stored[0].float(), [t.float() for t in stored[1:]])
    assert merged.dtype == dtype
    assert torch.equal(merged, reference.to(dtype))
    # A merge done in half precision could not have moved this far from the sum:
    # Adam's steps of 1e-5 round away next to weights of ~0.05.
    summed = merge(stored[0], stored[1:], iterations=0)
    assert int((summed != merged).sum()) > merged.numel() // 2
    # Against the float32 checkpoints the half ones were rounded from, storage changed
    # the task vectors themselves, so only what that rounding does is comparable.
    # Task arithmetic is linear: it carries the rounding over exactly,
    # |delta| <= sum_i |d_expert_i| + (N-1) |d_base|, up to float32 rounding of the
    # 2N+1 operations in each merge. Adam's displacement from the sum has no a-priori
    # bound tighter than its travel (iterations * lr); for the solve, the equality
    # above (the float32 merge of the stored values, rounded once) is the statement.
    stored_sum = merge(stored[0].float(), [t.float() for t in stored[1:]], iterations=0)
    assert torch.equal(summed, stored_sum.to(dtype))
    rounding = [(t.to(dtype).float() - t).abs() for t in (base, *experts)]
    carried = sum(rounding[1:]) + (len(experts) - 1) * rounding[0]
    float32_slack = (2 * len(experts) + 1) * torch.finfo(torch.float32).eps * sum(
        t.abs() for t in (base, *experts)
    )
    float32_sum = merge(base, experts, iterations=0)
    assert bool(((stored_sum - float32_sum).abs() <= carried + float32_slack).all())
    assert bool(((stored_sum - float32_sum).abs() > float32_slack).any())  # rounding mattered


def test_mixed_dtypes_are_promoted_and_out_dtype_rounds_once():
    base, experts = models()
    mixed = [base.bfloat16(), experts[0], experts[1].half(), experts[2].bfloat16()]
    merged = merge(mixed[0], mixed[1:])
    reference = merge(mixed[0].float(), [t.float() for t in mixed[1:]])
    assert merged.dtype == torch.float32 and torch.equal(merged, reference)
    rounded = merge_tensors(mixed, "wudi", base_index=0, name=LINEAR, out_dtype=torch.bfloat16)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, reference.bfloat16())


def test_result_beyond_the_storage_range_is_an_error():
    base, experts = models()
    stored = [t.half() for t in (base, *experts)]
    with pytest.raises(ValueError, match=rf"'{LINEAR}' does not fit in torch.float16"):
        merge(stored[0], stored[1:], **{"lambda": 1e7})


# 6. Structure -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (7,), (3, 4, 5), (2, 3, 4, 5)], ids=lambda s: f"{len(s)}-D")
def test_tensors_that_are_not_matrices_get_task_arithmetic(shape):
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=generator)
    experts = [base + 0.01 * torch.randn(shape, generator=generator) for _ in range(2)]
    merged = merge(base, experts, name="conv.weight", weight=[0.5, 2.0], **{"lambda": 0.7})
    expected = base.double() + 0.7 * sum(
        w * (e.double() - base.double()) for w, e in zip([0.5, 2.0], experts)
    )
    torch.testing.assert_close(merged, expected.float(), rtol=1e-6, atol=1e-7)


def test_structural_errors_in_memory():
    base, experts = models()
    with pytest.raises(ValueError, match=f"requires a base input for {LINEAR}"):
        merge_tensors([base, *experts], "wudi", name=LINEAR)
    with pytest.raises(ValueError, match=rf"Tensor size mismatch for {LINEAR}: \[\(16, 12\), \(16, 12\), \(15, 12\)"):
        merge(base, [experts[0], experts[1][:-1]])
    with pytest.raises(ValueError, match=f"at least 1 non-base inputs for {LINEAR}; got 0"):
        merge(base, [])
    with pytest.raises(ValueError, match=r"different tensor keys: \{'code': \['bias'\]\}"):
        merge_state_dicts(
            {"base": {"w": base, "bias": base[0]}, "math": {"w": experts[0], "bias": base[0]},
             "code": {"w": experts[1]}},
            "wudi", base="base",
        )
    with pytest.raises(ValueError, match="at least one task vector"):
        solvers.wudi_adam([])


# 7. Properties of the solver on random small problems ---------------------------------

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)


@st.composite
def task_vector_sets(draw):
    """1-5 Gaussian task vectors of a random small shape and scale; some may be zero
    (an expert that left the tensor untouched), never all."""
    out_features, in_features = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    count = draw(st.integers(1, 5))
    scale = 10 ** draw(st.floats(-4, -1))
    untouched = draw(st.sets(st.integers(0, count - 1), max_size=count - 1))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return [
        torch.zeros(out_features, in_features) if index in untouched
        else scale * torch.randn(out_features, in_features, generator=generator)
        for index in range(count)
    ]


def changed(taus):
    """The task vectors the references can take (they divide by ||tau_i||^2)."""
    return [tau for tau in taus if tau.any()]


@PROPERTY_SETTINGS
@given(taus=task_vector_sets(), iterations=st.sampled_from([1, 30, 100]), data=st.data())
def test_adam_properties(taus, iterations, data):
    merged = solvers.wudi_adam(taus, iterations=iterations)
    assert relative_error(merged, authors_wudi(changed(taus), iterations=iterations)) < 1e-5
    start = sum(taus)
    assert eq21(merged, taus) <= eq21(start, taus)
    order = data.draw(st.permutations(range(len(taus))))
    shuffled = solvers.wudi_adam([taus[i] for i in order], iterations=iterations)
    assert relative_error(shuffled, merged) < 1e-5


@PROPERTY_SETTINGS
@given(taus=task_vector_sets(), omega=st.floats(1e-4, 1.0), data=st.data())
def test_closed_form_properties(taus, omega, data):
    merged = solvers.wudi_closed_form(taus, omega=omega)
    active = changed(taus)
    expected = normal_equations_wudi_cfs(active, omega) if len(active) > 1 else active[0]
    # A float64 Cholesky solve against a float64 explicit inverse (a float32
    # solve would be 1e-7 off or worse).
    assert relative_error(merged, expected) < 1e-9
    order = data.draw(st.permutations(range(len(taus))))
    shuffled = solvers.wudi_closed_form([taus[i] for i in order], omega=omega)
    assert relative_error(shuffled, merged) < 1e-5


# mergekit configurations --------------------------------------------------------------


def config(paths, parameters=None, **extra):
    base, *experts = paths
    return {
        "merge_method": "wudi",
        "base_model": str(base),
        "models": [{"model": str(expert)} for expert in experts],
        "parameters": {"iterations": 20, **(parameters or {})},
        **extra,
    }


def edited_copy(source: Path, destination: Path, edit) -> Path:
    """A copy of a saved model whose state dict went through ``edit`` (in place)."""
    shutil.copytree(source, destination)
    weights = load_file(destination / "model.safetensors")
    edit(weights)
    save_file(weights, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


@pytest.fixture
def tensor_reads(monkeypatch):
    """How many tensors mergekit has read from disk so far."""
    reads = []
    get_tensor = LazyTensorLoader.get_tensor

    def counted(self, *args, **kwargs):
        reads.append(args[0] if args else kwargs)
        return get_tensor(self, *args, **kwargs)

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", counted)
    return reads


def merge_in_process(configuration: dict, out: Path) -> None:
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(configuration))),
        str(out),
        MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False),
    )


def assert_no_weights(out: Path) -> None:
    assert not (out.exists() and list(out.glob("*.safetensors")))


BAD_PARAMETERS = [
    ({"iterations": -5}, r"'iterations' must be a non-negative integer, got -5"),
    ({"iterations": 2.5}, r"'iterations' must be a non-negative integer, got 2.5"),
    ({"learning_rate": 0}, r"'learning_rate' must be > 0, got 0"),
    ({"learning_rate": -1e-5}, r"'learning_rate' must be > 0"),
    ({"lambda": math.nan}, r"'lambda' must be finite, got nan"),
    ({"lambda": "fast"}, r"'lambda' must be a number, got 'fast'"),
    ({"omega": "0"}, r"'omega' must be > 0, got '0'"),
    ({"iteration": 50}, r"Unknown parameter\(s\) for wudi: iteration \(known:"),
]


@pytest.mark.parametrize("parameters,message", BAD_PARAMETERS)
def test_bad_parameters_fail_before_any_tensor_is_read(parameters, message, families, tensor_reads, tmp_path):
    with pytest.raises((ValueError, TypeError), match=message):
        merge_in_process(config(families("llama"), parameters), tmp_path / "out")
    assert tensor_reads == []
    assert not (tmp_path / "out").exists()


def test_bad_per_model_parameter_fails_before_any_tensor_is_read(families, tensor_reads, tmp_path):
    configuration = config(families("llama"))
    configuration["models"][1]["parameters"] = {"wieght": 2.0}
    with pytest.raises(TypeError, match=r"Unknown parameter\(s\) for wudi: wieght"):
        merge_in_process(configuration, tmp_path / "out")
    configuration["models"][1]["parameters"] = {"weight": "heavy"}
    expert = re.escape(configuration["models"][1]["model"])
    with pytest.raises(ValueError, match=rf"^wudi parameter 'weight' of model {expert} must be a number, got 'heavy'$"):
        merge_in_process(configuration, tmp_path / "out")
    assert tensor_reads == []
    assert not (tmp_path / "out").exists()


def test_configuration_errors_fail_before_any_tensor_is_read(families, tensor_reads, tmp_path):
    base, *experts = families("llama")
    no_base = config([base, *experts])
    del no_base["base_model"]
    with pytest.raises(ValueError, match="requires a base input"):
        merge_in_process(no_base, tmp_path / "out")
    with pytest.raises(ValueError, match="at least 1 non-base inputs .*got 0"):
        merge_in_process(config([base, base]), tmp_path / "out")
    with pytest.raises(RuntimeError, match="Exactly one of 'models', 'slices', or 'modules'"):
        merge_in_process(config([base]), tmp_path / "out")
    assert tensor_reads == []
    assert not (tmp_path / "out").exists()


def test_missing_or_misshapen_expert_tensors_are_named(families, tmp_path):
    base, first, second, _ = families("llama")
    missing = edited_copy(second, tmp_path / "missing",
                          lambda w: w.pop("model.layers.0.mlp.down_proj.weight"))
    with pytest.raises(RuntimeError, match=rf"down_proj.weight required but not present in model {re.escape(str(missing))}"):
        merge_in_process(config([base, first, missing]), tmp_path / "out")

    def shorten(weights):
        weights["model.layers.1.self_attn.q_proj.weight"] = weights["model.layers.1.self_attn.q_proj.weight"][:-1].clone()

    misshapen = edited_copy(second, tmp_path / "misshapen", shorten)
    # mergekit lists the shapes of the experts in recipe order, then the base's.
    with pytest.raises(ValueError, match=r"Tensor size mismatch for model.layers.1.self_attn.q_proj.weight: \[\(64, 64\), \(63, 64\), \(64, 64\)\]"):
        merge_in_process(config([base, first, misshapen]), tmp_path / "out")
    assert_no_weights(tmp_path / "out")


def test_nan_in_the_base_names_it(families, tmp_path):
    base, first, second, _ = families("llama")

    def poison(weights):
        weights["model.layers.1.post_attention_layernorm.weight"][5] = math.nan

    poisoned = edited_copy(base, tmp_path / "nan_base", poison)
    with pytest.raises(ValueError, match=rf"tensor 'model.layers.1.post_attention_layernorm.weight' of base model {re.escape(str(poisoned))} contains NaN"):
        merge_in_process(config([poisoned, first, second]), tmp_path / "out")
    assert_no_weights(tmp_path / "out")


@pytest.mark.slow
def test_console_script_names_inf_tensor_and_model(families, tmp_path):
    base, first, second, _ = families("llama")

    def poison(weights):
        weights["model.layers.1.mlp.up_proj.weight"][3, 4] = math.inf

    poisoned = edited_copy(second, tmp_path / "inf_expert", poison)
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config([base, first, poisoned], dtype="float32")))
    result = run_console_script("mergekit-yaml", tmp_path / "config.yml", tmp_path / "out")
    assert result.returncode != 0
    assert f"tensor 'model.layers.1.mlp.up_proj.weight' of model {poisoned} contains NaN or Inf" in result.stderr
    assert_no_weights(tmp_path / "out")


# 3 and 8. Repeated and interrupted runs of mergekit-yaml -----------------------------

# Shards of 5K parameters: the tiny model is written as 21 files, one at a time, so a
# kill mid-merge leaves some of them on disk, as a large model's merge would.
SHARDED = ("--out-shard-size", "5K")
MODEL_CARD = "README.md"


# mergekit-yaml's own entry point in a child that SIGKILLs itself (no handler, no
# cleanup) halfway through writing its third shard. A kill from outside would race
# the merge: on a fast machine the tiny merge can finish first.
KILLED_WHILE_WRITING_SHARD_3 = """
import os, signal, sys
import safetensors.torch
from mergekit.scripts.run_yaml import main

save_file, written = safetensors.torch.save_file, []

def save_and_die_on_the_third(tensors, path, *args, **kwargs):
    save_file(tensors, path, *args, **kwargs)
    written.append(path)
    if len(written) == 3:
        os.truncate(path, os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = save_and_die_on_the_third
main(sys.argv[1:], prog_name="mergekit-yaml")
"""


def output_files(directory: Path) -> dict:
    return {path.name: path.read_bytes() for path in directory.iterdir()}


@pytest.mark.slow
def test_a_killed_merge_rerun_in_place_writes_the_same_bytes_as_an_uninterrupted_run(families, tmp_path):
    """Items 3 and 8 at the cost of three runs: the second run goes into the directory a
    killed run left behind, and must still write exactly the first run's files."""
    recipe = tmp_path / "config.yml"
    recipe.write_text(yaml.safe_dump(config(families("llama"))))
    # Both outputs are named "merged": the model card quotes the directory's name.
    first, second = tmp_path / "first" / "merged", tmp_path / "second" / "merged"
    result = run_console_script("mergekit-yaml", recipe, first, *SHARDED)
    assert result.returncode == 0, result.stderr[-3000:]

    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_WRITING_SHARD_3, str(recipe), str(second), *SHARDED],
        capture_output=True, text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # What mergekit 0.1.5 leaves behind: the shards written so far under provisional
    # names, the last one truncated, and nothing else: no config.json, no index, no
    # tokenizer, no model card. transformers refuses to load such a directory.
    left = output_files(second)
    assert sorted(left) == ["model-1.safetensors", "model-2.safetensors", "model-3.safetensors"]
    assert left["model-1.safetensors"] == (first / "model-00001-of-00021.safetensors").read_bytes()

    # The same command again overwrites those shards and renames them: nothing stale.
    result = run_console_script("mergekit-yaml", recipe, second, *SHARDED)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, rerun = output_files(first), output_files(second)
    assert rerun.keys() == expected.keys()
    assert {"config.json", "model.safetensors.index.json", "model-00021-of-00021.safetensors"} <= rerun.keys()
    assert [name for name in expected if rerun[name] != expected[name]] in ([], [MODEL_CARD])
    # mergekit 0.1.5 lists the models in its card in set order, which follows Python's
    # per-process string hashing: the same lines, possibly in another order.
    assert sorted(rerun[MODEL_CARD].splitlines()) == sorted(expected[MODEL_CARD].splitlines())


# 4 (continued). Storage dtypes through a configuration -------------------------------


@pytest.fixture(scope="module")
def mixed_family(tmp_path_factory):
    """bfloat16 base and first expert, the second expert saved in float32 (same values)."""
    root = tmp_path_factory.mktemp("mixed")
    base, first, second = write_family(root, "llama", experts=2, dtype=torch.bfloat16)
    weights = load_file(second / "model.safetensors")
    save_file({k: v.float() for k, v in weights.items()}, second / "model.safetensors", metadata={"format": "pt"})
    return [base, first, second]


def test_configured_dtypes_do_the_math_in_float32_and_round_once(mixed_family, tmp_path):
    outputs = {}
    for label, extra in {
        "float32": {"dtype": "float32"},
        "promoted": {},
        "out_bfloat16": {"dtype": "float32", "out_dtype": "bfloat16"},
        "bfloat16": {"dtype": "bfloat16"},
    }.items():
        merge_in_process(config(mixed_family, **extra), tmp_path / label)
        outputs[label] = load_weights(tmp_path / label)
    reference = outputs["float32"]
    assert {t.dtype for t in reference.values()} == {torch.float32}
    for label, expected_dtype in [("promoted", torch.float32), ("out_bfloat16", torch.bfloat16),
                                  ("bfloat16", torch.bfloat16)]:
        assert outputs[label].keys() == reference.keys()
        for name, tensor in outputs[label].items():
            assert tensor.dtype == expected_dtype, (label, name)
            assert torch.equal(tensor, reference[name].to(expected_dtype)), (label, name)
    # The solve really moved the linear weights beyond bf16 rounding of the sum.
    summed = tmp_path / "summed"
    merge_in_process(config(mixed_family, {"iterations": 0}, dtype="bfloat16"), summed)
    moved = load_weights(summed)[LINEAR] != outputs["bfloat16"][LINEAR]
    assert int(moved.sum()) > moved.numel() // 2
