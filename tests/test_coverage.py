"""Coverage over models nobody on the team wrote (tests/coverage_checks.py): capture at batch 1 and 8,
0 silent weight ops for every pass, Tucker at full rank exact, shift → ONNX → onnxruntime with the
plugin at batch 1 and 2, save/load exact. Three small models run in the quick suite, the rest are
slow; scripts/coverage.py writes docs/coverage.md from the same checks."""
import pytest

import coverage_checks as cc

pytestmark = pytest.mark.usefixtures("one_thread")


def _param(spec):
    return pytest.param(spec, id=spec.name, marks=() if spec.quick else pytest.mark.slow)


def _check(spec):
    result = cc.run_model(spec)
    assert result.error is None, result.error
    assert result.census > 0
    assert result.capture_error <= cc.CAPTURE_TOL, result.capture_error
    for key, p in result.passes.items():
        assert p.error is None, (key, p.error)
        assert not p.silent, (key, "silent weight ops", p.silent)
        assert not p.false_claims, (key, "reported converted, graph runs the original", p.false_claims)
    assert result.passes["tucker_full"].converted > 0 and result.passes["shift_q5"].converted > 0
    assert result.tucker_full_layer_error <= cc.TUCKER_EXACT, result.tucker_full_layer_error
    assert result.tucker_full_error <= cc.TUCKER_OUTPUT, result.tucker_full_error
    assert set(result.onnx_error) == {1, 2} and max(result.onnx_error.values()) <= cc.ONNX_TOL, result.onnx_error
    assert result.save_load_error == 0.0
    assert result.ok()


@pytest.mark.parametrize("spec", [_param(s) for s in cc.SPECS])
def test_model_coverage(spec):
    _check(spec)


def _torchvision_specs():
    try:
        return [pytest.param(s, id=s.name, marks=pytest.mark.slow) for s in cc.torchvision_specs()]
    except ImportError:
        return []


@pytest.mark.parametrize("spec", _torchvision_specs())
def test_torchvision_coverage(spec):
    _check(spec)
