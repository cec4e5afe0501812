"""The mergekit binding, through mergekit's own in-memory API (merge_tensors)."""

import logging

import pytest
import torch
from mergekit.merge_methods.api import merge_tensors

from mergekit_wudi import problems, solvers
from tests.oracle import (
    authors_wudi,
    clamped_spectrum,
    gavish_donoho_rank,
    gradient_flow,
    normal_equations_wudi_cfs,
    participation_sqrt_rank,
    relative_error,
    spectral_reference,
    structured_task_vectors,
)

LINEAR = "model.layers.0.self_attn.q_proj.weight"


def make_models(count=3, shape=(24, 16), seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator) * 0.05
    taus = structured_task_vectors(count, *shape, seed=seed + 1, scale=1e-2)
    return base, [base + tau for tau in taus]


def wudi(base, experts, name=LINEAR, **parameters):
    return merge_tensors([base, *experts], "wudi", base_index=0, name=name, parameters=parameters)


def task_arithmetic(base, experts, name, **parameters):
    parameters.setdefault("weight", 1.0)
    return merge_tensors(
        [base, *experts], "task_arithmetic", base_index=0, name=name, parameters=parameters
    )


def test_linear_weight_is_base_plus_oracle():
    base, experts = make_models()
    merged = wudi(base, experts)
    expected = authors_wudi([expert - base for expert in experts])
    assert relative_error(merged - base, expected) < 1e-5


def test_weights_scale_task_vectors_and_lambda_scales_the_result():
    base, experts = make_models(2)
    merged = wudi(base, experts, weight=[0.5, 2.0], **{"lambda": 0.3})
    expected = authors_wudi([0.5 * (experts[0] - base), 2.0 * (experts[1] - base)])
    assert relative_error(merged - base, 0.3 * expected) < 1e-5


@pytest.mark.parametrize(
    "name,shape",
    [
        ("model.embed_tokens.weight", (24, 16)),
        ("embeddings.position_embeddings.weight", (24, 16)),
        ("model.layers.0.input_layernorm.weight", (16,)),
        ("model.layers.0.self_attn.q_proj.bias", (16,)),
        ("conv.weight", (4, 3, 2, 2)),
    ],
)
def test_other_tensors_are_task_arithmetic(name, shape):
    base, experts = make_models(3, shape=shape) if len(shape) == 2 else (None, None)
    if base is None:
        generator = torch.Generator().manual_seed(1)
        base = torch.randn(shape, generator=generator)
        experts = [base + 0.01 * torch.randn(shape, generator=generator) for _ in range(3)]
    merged = wudi(base, experts, name=name, weight=[1.0, 0.5, 2.0], **{"lambda": 0.7})
    expected = task_arithmetic(base, experts, name, weight=[1.0, 0.5, 2.0], **{"lambda": 0.7})
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-7)


def test_zero_iterations_is_exactly_task_arithmetic():
    base, experts = make_models()
    merged = wudi(base, experts, iterations=0)
    assert torch.equal(merged, task_arithmetic(base, experts, LINEAR))
    assert relative_error(wudi(base, experts), merged) > 1e-3
    # bf16 storage: the float32 sum rounded once; mergekit's own task_arithmetic
    # rounds differently in some entries (60 of 384 here).
    base, experts = base.bfloat16(), [expert.bfloat16() for expert in experts]
    merged = wudi(base, experts, iterations=0)
    ours = (base.float() + sum(expert.float() - base.float() for expert in experts)).bfloat16()
    assert torch.equal(merged, ours)
    theirs = task_arithmetic(base, experts, LINEAR)
    assert not torch.equal(merged, theirs)
    # Apart by at most a bf16 rounding step at the tensor's magnitude.
    step = 2**-7 * float(merged.float().abs().max())
    assert float((theirs.float() - merged.float()).abs().max()) <= step


def test_float64_checkpoints_adam_solves_in_float32_the_others_in_float64(monkeypatch):
    # docs/errors.md: Adam keeps float32 at ordinary magnitudes (a float64 loop
    # gives the same merge to 1e-7); closed_form, spectral and task arithmetic
    # are float64 throughout.
    base, experts = make_models()
    base, experts = base.double(), [expert.double() for expert in experts]
    taus = [expert - base for expert in experts]
    solved = []
    adam = solvers.wudi_adam
    monkeypatch.setattr(solvers, "wudi_adam", lambda *a, **k: solved.append(adam(*a, **k)) or solved[-1])
    merged = wudi(base, experts)
    assert merged.dtype == torch.float64 and solved[0].dtype == torch.float32
    assert relative_error(merged - base, authors_wudi(taus, dtype=torch.float64)) < 1e-6
    closed_form = wudi(base, experts, solver="closed_form", omega=1e-3)
    assert relative_error(closed_form - base, normal_equations_wudi_cfs(taus, 1e-3)) < 1e-11
    norm = "model.norm.weight"
    assert torch.equal(wudi(base[0], [expert[0] for expert in experts], name=norm),
                       base[0] + sum(tau[0] for tau in taus))


def test_lm_head_falls_back_by_default_and_opts_in():
    base, experts = make_models()
    default = wudi(base, experts, name="lm_head.weight")
    torch.testing.assert_close(
        default, task_arithmetic(base, experts, "lm_head.weight"), rtol=1e-6, atol=1e-7
    )
    opted_in = wudi(base, experts, name="lm_head.weight", apply_wudi="always")
    assert relative_error(opted_in - base, authors_wudi([e - base for e in experts])) < 1e-5


def test_gpt2_conv1d_is_solved_on_the_out_in_view():
    base, experts = make_models(3, shape=(16, 40))  # stored [in, out]
    name = "transformer.h.0.mlp.c_fc.weight"
    merged = wudi(base, experts, name=name)
    expected = authors_wudi([(expert - base).T for expert in experts]).T
    assert relative_error(merged - base, expected) < 1e-5
    # Solving the stored orientation is a different method: make sure it differs.
    assert relative_error(merged, wudi(base, experts, name=name, layout="out_in")) > 1e-4


def test_closed_form_solver():
    base, experts = make_models()
    merged = wudi(base, experts, solver="closed_form", omega=1e-3)
    expected = solvers.wudi_closed_form([e - base for e in experts], omega=1e-3)
    assert relative_error(merged - base, expected) < 1e-5


def test_spectral_solver_is_the_gradient_flow():
    base, experts = make_models()
    taus = [expert - base for expert in experts]
    merged = wudi(base, experts, solver="spectral", **{"lambda": 0.5})
    assert relative_error(merged - base, 0.5 * gradient_flow(taus, 300.0)) < 1e-6
    # flow_time as YAML writes it (`flow_time: 3e1` is the string "3e1").
    merged = wudi(base, experts, solver="spectral", flow_time="3e1")
    assert relative_error(merged - base, gradient_flow(taus, 30.0)) < 1e-6


def test_spectral_rank_cut_and_automatic_rank():
    base, experts = make_models()  # [24, 16]
    taus = [expert - base for expert in experts]
    swudi = wudi(base, experts, solver="spectral", flow_time=1300, rank_ratio=0.65)
    assert relative_error(swudi - base, spectral_reference(taus, 1300.0, 11)) < 1e-6
    # The authors' ASWUDI: YAML's .inf is float("inf").
    aswudi = wudi(base, experts, solver="spectral", flow_time=float("inf"), rank_ratio="auto")
    kept = participation_sqrt_rank(clamped_spectrum(taus))
    assert kept < 16
    assert relative_error(aswudi - base, spectral_reference(taus, float("inf"), kept)) < 1e-6
    # rank_rule reaches the solver: Gavish-Donoho keeps another K here.
    gavish = wudi(base, experts, solver="spectral", flow_time=float("inf"), rank_ratio="auto",
                  rank_rule="gavish_donoho")
    other = gavish_donoho_rank(clamped_spectrum(taus), (24, 16))
    assert other != kept
    assert relative_error(gavish - base, spectral_reference(taus, float("inf"), other)) < 1e-6


def test_spectral_zero_flow_time_is_task_arithmetic():
    base, experts = make_models()
    torch.testing.assert_close(
        wudi(base, experts, solver="spectral", flow_time=0),
        task_arithmetic(base, experts, LINEAR), rtol=1e-6, atol=1e-7,
    )


def test_storage_dtype_is_kept_and_math_is_float32():
    base, experts = make_models()
    merged = wudi(base.bfloat16(), [e.bfloat16() for e in experts])
    assert merged.dtype == torch.bfloat16
    reference = wudi(base.bfloat16().float(), [e.bfloat16().float() for e in experts])
    torch.testing.assert_close(merged, reference.bfloat16(), rtol=0, atol=0)


def test_one_expert_is_that_expert_and_untouched_is_base():
    base, experts = make_models(1)
    assert torch.equal(wudi(base, experts), experts[0])
    assert torch.equal(wudi(base, [base.clone(), base.clone()]), base)


@pytest.mark.parametrize("solver", ["adam", "spectral"])
def test_nan_input_names_tensor_and_model(solver):
    base, experts = make_models()
    experts[1][3, 4] = float("nan")
    with pytest.raises(ValueError, match=rf"tensor '{LINEAR}' of model 2 contains NaN or Inf"):
        wudi(base, experts, solver=solver)


@pytest.mark.parametrize(
    "parameters,message",
    [
        ({"iterations": -1}, "'iterations' must be a non-negative integer, got -1"),
        ({"iterations": 2.5}, "'iterations' must be a non-negative integer, got 2.5"),
        ({"iterations": "many"}, "'iterations' must be a number, got 'many'"),
        ({"learning_rate": 0}, "'learning_rate' must be > 0, got 0"),
        ({"lambda": float("nan")}, "'lambda' must be finite, got nan"),
        ({"weight": True}, "'weight' must be a number, got True"),
        ({"solver": "sgd"}, "'solver' must be one of adam, closed_form, spectral; got 'sgd'"),
        ({"omega": -1e-3}, "'omega' must be > 0"),
        ({"apply_wudi": "sometimes"}, "'apply_wudi' must be one of auto, always, never"),
        ({"flow_time": -1}, "'flow_time' must be >= 0, got -1"),
        ({"flow_time": float("-inf")}, "'flow_time' must be >= 0, got -inf"),
        ({"flow_time": float("nan")}, r"'flow_time' must be a number or \.inf, got nan"),
        ({"flow_time": "long"}, "'flow_time' must be a number, got 'long'"),
        ({"rank_ratio": 1.5}, r"'rank_ratio' must be a number in \(0, 1\] or 'auto', got 1.5"),
        ({"rank_ratio": 0}, r"'rank_ratio' must be a number in \(0, 1\] or 'auto', got 0"),
        ({"rank_ratio": "automatic"}, r"'rank_ratio' must be .* or 'auto', got 'automatic'"),
        ({"rank_rule": "elbow"},
         "'rank_rule' must be one of participation_sqrt, gavish_donoho; got 'elbow'"),
        ({"precision": "bf16"}, "'precision' must be one of auto, float64, float32; got 'bf16'"),
        ({"iteration": 50}, "Unknown parameter.*iteration"),
    ],
)
def test_bad_parameters_are_named(parameters, message):
    base, experts = make_models(2)
    with pytest.raises((ValueError, TypeError), match=message):
        wudi(base, experts, **parameters)


def test_yaml_style_numeric_strings_are_numbers():
    # PyYAML reads `learning_rate: 1e-5` as the string "1e-5".
    base, experts = make_models(2)
    assert torch.equal(
        wudi(base, experts, learning_rate="3e-5", iterations="20"),
        wudi(base, experts, learning_rate=3e-5, iterations=20),
    )


@pytest.mark.parametrize("precision", ["auto", "float64", "float32"])
def test_precision_chooses_the_accurate_products(precision, monkeypatch):
    seen = []
    solve = solvers.wudi_adam
    monkeypatch.setattr(solvers, "wudi_adam", lambda *a, **k: seen.append(k) or solve(*a, **k))
    base, experts = make_models()
    merged = wudi(base, experts, precision=precision)
    assert seen[0]["float64_matmuls"] == {"auto": None, "float64": True, "float32": False}[precision]
    expected = authors_wudi([expert - base for expert in experts])
    assert relative_error(merged - base, expected) < 1e-5


def test_a_solve_that_fits_stays_and_one_that_does_not_moves_to_the_cpu(caplog):
    cuda = torch.device("cuda", 1)
    assert problems.solve_device("x.weight", cuda, needed=2**30, free=2**31) == cuda
    assert problems.solve_device("x.weight", torch.device("cpu"), needed=2**40, free=None).type == "cpu"
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="mergekit_wudi.problems"):
        assert problems.solve_device("x.weight", cuda, needed=3 * 2**30, free=2**30).type == "cpu"
    assert "'x.weight' needs about 3.00 GiB to solve and cuda:1 has 1.00 GiB free" in caplog.text


@pytest.mark.parametrize("solver", ["adam", "closed_form", "spectral"])
def test_merge_asks_for_the_solve_s_memory_and_falls_back_with_a_warning(solver, monkeypatch, caplog):
    # A 70B down_proj on a 24 GB GPU, scaled down: the free memory reported is
    # smaller than the solve needs, so the tensor is solved on the CPU (here the
    # CPU already) with a warning naming it, and the result is unchanged.
    base, experts = make_models(3, shape=(24, 40))
    expected = wudi(base, experts, solver=solver)
    asked = []
    monkeypatch.setattr(problems, "free_memory", lambda device: asked.append(device) or 1024)
    with caplog.at_level(logging.WARNING, logger="mergekit_wudi.problems"):
        merged = wudi(base, experts, solver=solver)
    assert asked == [base.device]
    assert f"tensor {LINEAR!r} needs about" in caplog.text and "solving it on the CPU" in caplog.text
    assert torch.equal(merged, expected)
    needed = problems.solve_bytes(problems.TaskVectors(base, experts, [1.0] * 3),
                                  {"solver": problems.Solver(solver)})
    estimate = {"adam": solvers.adam_working_bytes, "closed_form": solvers.closed_form_working_bytes,
                "spectral": solvers.spectral_working_bytes}[solver]
    assert needed > estimate(24, 40, 3)


# A device distinct from the tensors' own (torch.device("cpu") != "cpu:0") on
# which tensors are still made on the CPU: the fit check really moves the problem
# (a new TaskVectors, labelled cpu:0), and the test sees on which device each
# step reads it, as a CUDA run would.
ANOTHER_DEVICE = torch.device("cpu", 0)


def watch_devices(monkeypatch, solver):
    """Record the device of the task vectors each solve and each -v loss reads."""
    seen = {"solve": [], "losses": []}
    for key, name in (("solve", f"wudi_{solver}"), ("losses", "interference_losses")):
        original = getattr(solvers, name)

        def spy(task_vectors, *args, _original=original, _key=key, **kwargs):
            seen[_key].append(task_vectors.device)
            return _original(task_vectors, *args, **kwargs)

        monkeypatch.setattr(solvers, name, spy)
    return seen


@pytest.mark.parametrize("solver", ["adam", "closed_form", "spectral"])
def test_with_v_a_moved_solve_s_losses_read_the_moved_task_vectors(solver, monkeypatch, caplog):
    base, experts = make_models(3, shape=(24, 40))
    with caplog.at_level(logging.INFO, logger="mergekit_wudi"):
        expected = wudi(base, experts, solver=solver)
    expected_line = caplog.records[-1].getMessage().rsplit(";", 1)[0]  # less the time
    caplog.clear()
    seen = watch_devices(monkeypatch, solver)
    monkeypatch.setattr(problems, "FALLBACK_DEVICE", ANOTHER_DEVICE)
    monkeypatch.setattr(problems, "free_memory", lambda device: None if device == ANOTHER_DEVICE else 1024)
    with caplog.at_level(logging.INFO, logger="mergekit_wudi"):
        merged = wudi(base, experts, solver=solver)
    assert seen == {"solve": [ANOTHER_DEVICE], "losses": [ANOTHER_DEVICE]}
    assert torch.equal(merged, expected)
    assert caplog.records[-1].getMessage().rsplit(";", 1)[0] == expected_line


def test_the_v_losses_memory_is_inside_the_fit_check(monkeypatch, caplog):
    # Free memory between what the solve needs and what the solve and the -v
    # losses need: the solve stays without -v and moves with it.
    base, experts = make_models(3, shape=(24, 40))
    problem = problems.TaskVectors(base, experts, [1.0] * 3)
    solve_alone = problems.solve_bytes(problem, {"solver": problems.Solver.ADAM})
    with_losses = problems.losses_bytes(problem)
    assert solve_alone < with_losses
    seen = watch_devices(monkeypatch, "adam")
    monkeypatch.setattr(problems, "FALLBACK_DEVICE", ANOTHER_DEVICE)
    free = (solve_alone + with_losses) // 2
    monkeypatch.setattr(problems, "free_memory", lambda device: None if device == ANOTHER_DEVICE else free)
    wudi(base, experts)
    assert seen["solve"] == [base.device]
    with caplog.at_level(logging.INFO, logger="mergekit_wudi"):
        wudi(base, experts)
    assert seen["solve"] == [base.device, ANOTHER_DEVICE]
    assert seen["losses"] == [ANOTHER_DEVICE]
