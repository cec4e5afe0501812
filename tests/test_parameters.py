"""A bad parameter value: the last line a user reads is ours, naming parameter,
value and, for a per-model parameter, the model (the stderr of mergekit-yaml)."""

import pytest
import yaml
from mergekit.merge_methods.api import merge_tensors

from mergekit_wudi.parameters import ParameterValueError
from tests.conftest import run_console_script
from tests.test_method import make_models


def last_line_of_a_failed_merge(tmp_path, paths, parameters, expert_parameters=None):
    base, *experts = paths
    models = [{"model": str(expert)} for expert in experts]
    if expert_parameters:
        models[1]["parameters"] = expert_parameters
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "wudi", "base_model": str(base), "models": models, "parameters": parameters,
    }))
    result = run_console_script("mergekit-yaml", config, tmp_path / "out")
    assert result.returncode != 0
    assert not (tmp_path / "out").exists()
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_bad_per_model_value_names_the_model(families, tmp_path):
    paths = families("llama")
    last = last_line_of_a_failed_merge(tmp_path, paths, {"iterations": 5}, {"weight": "high"})
    assert last == f"ValueError: wudi parameter 'weight' of model {paths[2]} must be a number, got 'high'"


@pytest.mark.slow
def test_a_bad_global_value_is_the_last_line(families, tmp_path):
    last = last_line_of_a_failed_merge(tmp_path, families("llama"), {"iterations": -3})
    assert last == "ValueError: wudi parameter 'iterations' must be a non-negative integer, got -3"


def test_in_memory_the_error_carries_parameter_and_requirement():
    base, experts = make_models(2)
    with pytest.raises(ParameterValueError) as raised:
        merge_tensors([base, *experts], "wudi", base_index=0, parameters={"omega": "0"})
    assert (raised.value.parameter, raised.value.requirement) == ("omega", "must be > 0, got '0'")
    assert str(raised.value) == "wudi parameter 'omega' must be > 0, got '0'"
    assert "validation error" not in str(raised.value)
