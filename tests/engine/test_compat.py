"""vtprune.compat: the one module that knows transformers' calling conventions (5.23: ``past_key_values=``;
5.24+: ``cache=``). Checked against the installed transformers' own objects, whichever release it is."""

import dataclasses
import inspect
import warnings

import pytest
import torch
import transformers
from tiny import build, make_inputs
from transformers import DynamicCache, StaticCache, masking_utils

from vtprune import compat


def _host_keyword() -> str:
    params = inspect.signature(masking_utils.create_causal_mask).parameters
    return "cache" if "cache" in params else "past_key_values"


def test_get_cache_reads_either_keyword():
    cache = DynamicCache()
    assert compat.get_cache({"cache": cache}) is cache
    assert compat.get_cache({"past_key_values": cache}) is cache
    assert compat.get_cache({"cache": None, "past_key_values": cache}) is cache
    assert compat.get_cache({"use_cache": True}) is None


def test_output_cache_reads_the_declared_field_without_deprecation_logs(caplog):
    model = build("llava")
    inputs = make_inputs(model, "llava", [(3, 1, 2)])
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        no_cache = model(**inputs, use_cache=False)
    fields = {f.name for f in dataclasses.fields(out)}
    expected = out.cache if "cache" in fields else out.past_key_values
    with caplog.at_level("WARNING"), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.output_cache(out) is expected and expected is not None
        assert compat.output_cache(no_cache) is None
        assert compat.output_cache((torch.zeros(1),)) is None  # return_dict=False: nothing to read
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]


def test_causal_masks_match_the_host_call_and_warn_nothing():
    model = build("llava")
    cfg = model.config.text_config
    hidden = torch.zeros(2, 5, cfg.hidden_size)
    mask2d = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated keyword would raise here
        ours = compat.causal_masks(cfg, hidden, mask2d, None, {"full_attention": 0})
    ref = masking_utils.create_causal_mask(
        config=cfg, inputs_embeds=hidden, attention_mask=mask2d, position_ids=None, **{_host_keyword(): None}
    )
    assert set(ours) == {"full_attention"}
    if ref is None:
        assert ours["full_attention"] is None
    else:
        assert torch.equal(ours["full_attention"], ref)


def test_report_lengths_changes_what_consumers_read_not_what_masks_read():
    cache = DynamicCache()
    k = torch.zeros(1, 2, 7, 4)
    cache.update(k, k, 0)
    cache.update(k[:, :, :3], k[:, :, :3], 1)
    compat.report_lengths(cache, lambda c, layer: 10 * (layer + 1))
    assert cache.get_seq_length() == 17 and cache.get_seq_length(1) == 23
    assert cache.get_query_offset(0) == 7 and cache.get_query_offset(1) == 3
    assert compat.stored_length(cache, 0) == 7 and compat.stored_length(cache, 1) == 3
    assert cache.get_mask_sizes(1, 1)[0] == 4  # the mask functions' kv length: what layer 1 stores, + 1
    compat.restore_lengths(cache)
    assert cache.get_seq_length() == 7 and cache.get_query_offset(1) == 3
    assert "get_seq_length" not in vars(cache)


def test_static_caches_are_recognised():
    model = build("llava")
    static = StaticCache(config=model.config.text_config, max_cache_len=16)
    assert compat.is_static(static) and not compat.is_static(DynamicCache())


def test_check_transformers_names_the_supported_range(monkeypatch):
    compat.check_transformers()  # the installed release is supported
    for bad in ("5.22.2", "4.57.6", "6.0.0"):
        monkeypatch.setattr(transformers, "__version__", bad)
        with pytest.raises(ImportError, match=rf"transformers >= {compat.MIN_TRANSFORMERS}, < 6; found {bad}"):
            compat.check_transformers()


def test_versions_lists_the_packages_behaviour_depends_on():
    found = compat.versions()
    assert found["torch"] == torch.__version__.split("+")[0] or found["torch"] == torch.__version__
    assert found["transformers"] == transformers.__version__
    assert {"python", "lmms_eval", "filelock", "numpy"} <= set(found)


def test_reported_lengths_follow_a_deep_copy():
    """The overrides are bound to the cache they describe: a copy reports its own length, not the original's."""
    import copy

    cache = DynamicCache()
    k = torch.zeros(1, 2, 5, 4)
    cache.update(k, k, 0)
    cache.__dict__["hidden_columns"] = 10
    compat.report_lengths(cache, lambda c, layer: c.__dict__["hidden_columns"])
    snap = copy.deepcopy(cache)
    cache.update(k[:, :, :2], k[:, :, :2], 0)  # the original grows; the copy must not
    assert cache.get_seq_length() == 17 and cache.get_query_offset(0) == 7
    assert snap.get_seq_length() == 15 and snap.get_query_offset(0) == 5


def test_cache_keyword_lookup_traces_under_torch_compile_without_warnings():
    # compat's mask builders run inside a patched forward, which users torch.compile: the keyword lookup must trace
    # (fullgraph) without dynamo's "call to a functools.lru_cache-wrapped function" warning
    fn = masking_utils.create_causal_mask

    def f(x):
        return x + len(compat._cache_keyword(fn))

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(1))
    assert out.item() == len(compat._cache_keyword(fn)) > 0
