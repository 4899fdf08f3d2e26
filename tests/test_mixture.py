import json
import math

import numpy as np
import pytest

from megatron_doremi.data.mixture import Mixture, MixtureError, domain_name_from_prefix


def test_json_and_data_path_load_to_the_same_mixture(tmp_path):
    spec = {
        "domains": {
            "wiki": {"prefixes": ["wiki_text_document"], "weight": 3},
            "c4": {"prefixes": ["c4_text_document"], "weight": 1},
        }
    }
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(spec))
    from_json = Mixture.from_json(path)
    assert from_json.names == ("c4", "wiki")  # sorted by name
    np.testing.assert_allclose(from_json.weights, [0.25, 0.75])
    assert from_json.domains[1].prefixes == (str(tmp_path / "wiki_text_document"),)  # relative to the file
    from_dp = Mixture.from_data_path(f"0.75 {tmp_path}/wiki_text_document 0.25 {tmp_path}/c4_text_document")
    assert from_dp.names == from_json.names
    np.testing.assert_allclose(from_dp.weights, from_json.weights)
    assert [d.prefixes for d in from_dp.domains] == [d.prefixes for d in from_json.domains]


def test_outputs_round_trip_in_both_forms():
    mix = Mixture.from_data_path(["1", "a/x_text_document", "3", "b/y_text_document"])
    again = Mixture.from_dict(mix.to_json_dict())
    np.testing.assert_allclose(again.weights, mix.weights)
    again2 = Mixture.from_data_path(mix.to_data_path())
    np.testing.assert_allclose(again2.weights, mix.weights, rtol=1e-9)
    assert again2.names == mix.names


def test_data_path_groups_prefixes_of_one_domain():
    mix = Mixture.from_data_path("1 d/web_text_document 1 e/web_text_document 2 d/code_text_document")
    assert mix.names == ("code", "web")
    np.testing.assert_allclose(mix.weights, [0.5, 0.5])
    assert len(mix.domains[1].prefixes) == 2
    assert domain_name_from_prefix("data/wiki_text_document") == "wiki"


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"a": -1.0, "b": 1.0}, "must be >= 0"),
        ({"a": float("nan"), "b": 1.0}, "finite"),
        ({"a": 0.0, "b": 0.0}, "all domain weights are zero"),
        ({"a": "x", "b": 1.0}, "must be a number"),
    ],
)
def test_bad_weights_are_named(weights, message):
    spec = {"domains": {n: {"prefixes": [n], "weight": w} for n, w in weights.items()}}
    with pytest.raises(MixtureError, match=message) as info:
        Mixture.from_dict(spec)
    if "zero" not in message:
        assert "domains.a" in str(info.value)


def test_duplicate_domain_names_in_json_are_an_error(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text(
        '{"domains": {"a": {"prefixes": ["p"], "weight": 1}, "a": {"prefixes": ["q"], "weight": 2}}}'
    )
    with pytest.raises(MixtureError, match="duplicate key 'a'"):
        Mixture.from_json(path)


def test_structural_errors(tmp_path):
    with pytest.raises(MixtureError, match='key "domains"'):
        Mixture.from_dict({"weights": {}})
    with pytest.raises(MixtureError, match="prefixes"):
        Mixture.from_dict({"domains": {"a": {"weight": 1}}})
    with pytest.raises(MixtureError, match="weight: missing"):
        Mixture.from_dict({"domains": {"a": {"prefixes": ["p"]}}})
    with pytest.raises(MixtureError, match="odd number"):
        Mixture.from_data_path("0.5 a 0.5")
    with pytest.raises(MixtureError, match="should be a weight"):
        Mixture.from_data_path("a b c d")
    bad = tmp_path / "bad.json"
    bad.write_text('{"domains": \n {')
    with pytest.raises(MixtureError, match=r"bad.json:2"):
        Mixture.from_json(bad)
    with pytest.raises(MixtureError, match="cannot read"):
        Mixture.from_json(tmp_path / "missing.json")


def test_with_weights_checks_count_and_names():
    mix = Mixture.from_data_path("1 a 1 b 1 c")
    new = mix.with_weights({"a": 0.0, "b": 1.0, "c": 3.0})
    np.testing.assert_allclose(new.weights, [0, 0.25, 0.75])
    with pytest.raises(MixtureError, match="expected 3 weights"):
        mix.with_weights([1, 2])
    with pytest.raises(MixtureError, match="unknown"):
        mix.with_weights({"a": 1, "b": 1, "z": 1})
    with pytest.raises(MixtureError, match="finite"):
        mix.with_weights([1, math.inf, 1])
