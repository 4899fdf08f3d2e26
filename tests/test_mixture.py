import json
import math
import os

import numpy as np
import pytest

from megatron_doremi.data.mixture import Mixture, MixtureError, domain_name_from_prefix
from tests.conftest import write_shard


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
    from_dp = Mixture.from_data_path(f"0.25 {tmp_path}/c4_text_document 0.75 {tmp_path}/wiki_text_document")
    assert from_dp.names == from_json.names
    np.testing.assert_allclose(from_dp.weights, from_json.weights)
    assert [d.prefixes for d in from_dp.domains] == [d.prefixes for d in from_json.domains]
    reordered = Mixture.from_data_path(f"0.75 {tmp_path}/wiki_text_document 0.25 {tmp_path}/c4_text_document")
    assert reordered.names == ("wiki", "c4")  # a data path keeps its (Megatron dataset) order


def _shards(tmp_path, sizes):
    out = {}
    for rel, tokens in sizes.items():
        prefix = str(tmp_path / rel)
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        write_shard(prefix, [np.arange(tokens) % 50])
        out[rel] = prefix
    return out


def test_outputs_round_trip_in_both_forms_to_1e_12(tmp_path):
    mix = Mixture.from_data_path(
        ["1", "a/x_text_document", "3", "b/y_text_document", "0.1234567890123", "c/z"]
    )
    again = Mixture.from_dict(mix.to_json_dict())
    np.testing.assert_allclose(again.weights, sorted_weights(mix, again), rtol=0, atol=1e-12)
    again2 = Mixture.from_data_path(mix.to_data_path())
    assert again2.names == mix.names
    np.testing.assert_allclose(again2.weights, mix.weights, rtol=0, atol=1e-12)


def sorted_weights(mix, other):
    return [mix.weights[mix.index(n)] for n in other.names]


def test_multi_prefix_domain_shares_its_weight_by_tokens(tmp_path):
    p = _shards(
        tmp_path, {"big/web_text_document": 900, "small/web2_text_document": 100, "c/code_text_document": 10}
    )
    mix = Mixture.from_dict(
        {"domains": {"web": {"prefixes": [p["big/web_text_document"], p["small/web2_text_document"]], "weight": 0.6},
                     "code": {"prefixes": [p["c/code_text_document"]], "weight": 0.4}}}
    )  # fmt: skip
    text = mix.to_data_path()
    back = Mixture.from_data_path(text)
    got = {d.prefixes[0]: w for d, w in zip(back.domains, back.weights)}
    assert (
        abs(got[p["big/web_text_document"]] - 0.54) < 1e-12
        and abs(got[p["small/web2_text_document"]] - 0.06) < 1e-12
    )
    assert abs(got[p["c/code_text_document"]] - 0.4) < 1e-12
    # the same shares, from token counts given instead of read
    given = Mixture.from_data_path(
        mix.to_data_path({p["big/web_text_document"]: 9, p["small/web2_text_document"]: 1})
    )
    np.testing.assert_allclose(given.weights, back.weights, rtol=0, atol=1e-15)


def test_same_base_name_in_two_directories_gives_two_domains():
    mix = Mixture.from_data_path("1 d/web_text_document 1 e/web_text_document 2 d/code_text_document")
    assert mix.names == ("d/web", "e/web", "code")
    np.testing.assert_allclose(mix.weights, [0.25, 0.25, 0.5])
    assert all(len(d.prefixes) == 1 for d in mix.domains)
    assert domain_name_from_prefix("data/wiki_text_document") == "wiki"
    dup = Mixture.from_data_path("1 a/x 2 a/x")
    assert dup.names == ("x",) and dup.domains[0].weight == 3.0


def test_prefixes_without_weights_are_weighted_by_size(tmp_path):
    p = _shards(tmp_path, {"a_text_document": 300, "b_text_document": 100})
    mix = Mixture.from_data_path([p["a_text_document"], p["b_text_document"]])
    assert mix.weights_from_sizes and mix.names == ("a", "b")
    np.testing.assert_allclose(mix.weights, [0.75, 0.25])  # provisional: tokens
    single = Mixture.from_data_path(p["a_text_document"])
    assert single.weights_from_sizes and single.weights.tolist() == [1.0]
    with pytest.raises(MixtureError, match="missing index"):
        Mixture.from_data_path("a b c d")  # four prefixes without weights: their shards must exist


def test_data_args_file(tmp_path):
    args = tmp_path / "data_args.txt"
    args.write_text("0.3 a/x_text_document\n0.7\tb/y_text_document\n")
    mix = Mixture.load(str(args))
    assert mix.names == ("x", "y") and mix.source == str(args)
    np.testing.assert_allclose(mix.weights, [0.3, 0.7])


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
        Mixture.from_data_path("0.5 a b c")
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
