"""conftest.require_optional: a test that needs a missing (or too old) optional package skips on a developer
machine and fails under CI=true, where the [dev] extra is installed and a skip would hide a test that never ran."""
import pytest
from conftest import require_optional


@pytest.mark.parametrize("ci,outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_or_out_of_range_package_fails_on_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match=r"not installed.*pip install -e \.\[dev\]"):
        require_optional("nnssl_no_such_package")
    with pytest.raises(outcome, match=r"pytest .* is installed, this test needs >= 999"):
        require_optional("pytest", min_version="999")
    with pytest.raises(outcome, match=r"needs >= 1 and < 2"):
        require_optional("pytest", min_version="1", below_version="2")  # pytest >= 7 is required


def test_present_package_in_range_is_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require_optional("pytest", min_version="7") is pytest
