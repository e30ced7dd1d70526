"""Content key and store paths: any identity change gives a new key, hence a new path."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stores import StoreIdentity, StoreInputError, content_key, store_url
from stores.identity import canonical_json
from stores.location import key_prefix_of


def make_identity(**changes) -> StoreIdentity:
    base = dict(
        dataset="digits",
        backbone="test_vit",
        weights={"kind": "hub", "tag": "augreg_in21k"},
        data_config={"input_size": (3, 160, 160), "mean": (0.5, 0.5, 0.5), "crop_pct": 0.875},
        views=0,
        dtype="float16",
        versions={"timm": "1.0.31", "torch": "2.14.1"},
        input_fingerprint="ab" * 32,
    )
    return StoreIdentity(**(base | changes))


def test_key_is_sha256_hex_and_stable_across_normalization():
    a = make_identity()
    # tuples vs lists, dict order and NumPy scalars do not change the key
    b = make_identity(
        data_config={
            "crop_pct": np.float64(0.875),
            "mean": [0.5, 0.5, 0.5],
            "input_size": [3, 160, 160],
        }
    )
    assert a.key() == b.key() == content_key(a)
    assert len(a.key()) == 64 and set(a.key()) <= set("0123456789abcdef")
    assert a == b and hash(a) == hash(b)


def test_identity_roundtrips_through_json_attrs():
    a = make_identity(extra={"view_seed": 3})
    back = StoreIdentity.from_dict(json.loads(json.dumps(a.to_dict())))
    assert back == a and back.key() == a.key()


FIELD_CHANGES = st.one_of(
    st.tuples(
        st.just("dataset"),
        st.text("abcxyz_-. ", min_size=1, max_size=8).filter(
            lambda s: s.strip() not in {"", ".", ".."}
        ),
    ),
    st.tuples(
        st.just("backbone"), st.sampled_from(["test_resnet", "test_efficientnet", "resnet18"])
    ),
    st.tuples(
        st.just("weights"),
        st.one_of(
            st.fixed_dictionaries(
                {"kind": st.just("hub"), "tag": st.text("abc.", min_size=1, max_size=6)}
            ),
            st.fixed_dictionaries(
                {
                    "kind": st.just("checkpoint"),
                    "sha256": st.text("0123456789abcdef", min_size=64, max_size=64),
                }
            ),
            st.fixed_dictionaries({"kind": st.just("random"), "seed": st.integers(0, 10**6)}),
        ),
    ),
    st.tuples(
        st.just("data_config"),
        st.dictionaries(
            st.sampled_from(
                ["input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"]
            ),
            st.one_of(
                st.floats(0, 1),
                st.integers(1, 512),
                st.sampled_from(["bicubic", "bilinear", "center"]),
            ),
            min_size=1,
            max_size=3,
        ),
    ),
    st.tuples(st.just("views"), st.integers(0, 8)),
    st.tuples(st.just("dtype"), st.sampled_from(["float16", "float32"])),
    st.tuples(
        st.just("versions"),
        st.fixed_dictionaries({"timm": st.sampled_from(["1.0.30", "1.0.31", "1.1.0"])}),
    ),
    st.tuples(st.just("input_fingerprint"), st.text("0123456789abcdef", min_size=8, max_size=64)),
    st.tuples(
        st.just("extra"),
        st.dictionaries(st.sampled_from(["view_seed", "layer"]), st.integers(0, 9), min_size=1),
    ),
)


@settings(deadline=None, max_examples=150)
@given(FIELD_CHANGES)
def test_key_and_path_change_iff_some_field_changes(change):
    field_name, value = change
    base = make_identity()
    old = getattr(base, field_name)
    new = old | value if field_name in {"data_config", "versions", "extra"} else value
    other = dataclasses.replace(base, **{field_name: new})
    differs = canonical_json(other.to_dict()) != canonical_json(base.to_dict())
    assert (other.key() != base.key()) == differs
    assert (store_url("/data/stores", other) != store_url("/data/stores", base)) == differs


def test_store_url_layout_and_path_safety():
    ident = make_identity(
        backbone="hf-hub:timm/vit_base_patch16_224.augreg_in21k", dataset="my data"
    )
    url = store_url("s3://bucket/stores/", ident)
    assert (
        url
        == f"s3://bucket/stores/my-data/hf-hub-timm-vit_base_patch16_224.augreg_in21k-{ident.key()[:12]}.zarr"
    )
    assert key_prefix_of(url) == ident.key()[:12]
    assert store_url("memory://r", make_identity()).startswith("memory://r/digits/test_vit-")


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"dtype": "float64"}, "dtype"),
        ({"views": -1}, "views"),
        ({"weights": {"kind": "hub"}}, "weights"),
        ({"weights": {"kind": "mystery", "tag": "x"}}, "weights"),
        ({"dataset": ""}, "dataset"),
        ({"data_config": {"mean": float("nan")}}, "finite"),
        ({"data_config": {"fn": object()}}, "JSON"),
    ],
)
def test_identity_rejects_bad_fields_with_clear_message(changes, needle):
    with pytest.raises(StoreInputError, match=needle):
        make_identity(**changes)


def test_one_input_fingerprint_lives_in_pipeline_sources():
    """The unused stores-side duplicate (``fingerprint_inputs``) is gone: the input part of the
    key is ``ImageSource.fingerprint`` only."""
    import stores
    import stores.identity

    assert not hasattr(stores.identity, "fingerprint_inputs")
    assert "fingerprint_inputs" not in stores.__all__
