"""Chunk layout: a pure packing of parameters, checked on arbitrary sizes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homestar.errors import ConfigError
from homestar.runtime import choose_chunk_elems, plan_layout

sizes_st = st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(sizes=sizes_st, extra=st.integers(min_value=0, max_value=6000), align=st.sampled_from([1, 16, 64]))
def test_layout_packs_in_order_without_overlap(sizes, extra, align):
    named = [(f"p{i}", n) for i, n in enumerate(sizes)]
    chunk_elems = max(sizes) + extra
    layout = plan_layout(named, chunk_elems, align=align)
    assert [s.name for s in layout.slots] == [n for n, _ in named]
    previous = None
    for slot in layout.slots:
        assert slot.offset % align == 0
        assert 0 <= slot.offset and slot.offset + slot.numel <= chunk_elems
        if previous is not None:
            assert (slot.chunk, slot.offset) > (previous.chunk, previous.offset)
            if slot.chunk == previous.chunk:
                assert slot.offset >= previous.offset + previous.numel
            else:
                assert slot.chunk == previous.chunk + 1 and slot.offset == 0
        previous = slot
    assert layout.n_chunks == layout.slots[-1].chunk + 1
    assert layout.waste_elems == layout.n_chunks * chunk_elems - sum(sizes)


@settings(max_examples=40, deadline=None)
@given(sizes=sizes_st)
def test_chosen_chunk_size_holds_the_largest_and_wastes_least(sizes):
    named = [(f"p{i}", n) for i, n in enumerate(sizes)]
    candidates = [max(sizes) + k * 97 for k in range(12)] + [max(sizes) - 1]
    chosen = choose_chunk_elems(named, candidates=candidates, align=1)
    assert chosen >= max(sizes)
    best = min(plan_layout(named, c, align=1).waste_elems for c in candidates if c >= max(sizes))
    assert plan_layout(named, chosen, align=1).waste_elems == best


def test_default_candidates_for_a_gpt_shape_without_allocating():
    d, vocab, layers = 4096, 50304, 32  # a 6.7B GPT: planned, never allocated
    named = [("wte.weight", vocab * d), ("wpe.weight", 2048 * d)]
    for i in range(layers):
        named += [(f"h.{i}.ln_1.weight", d), (f"h.{i}.attn.c_attn.weight", 3 * d * d), (f"h.{i}.attn.c_proj.weight", d * d),
                  (f"h.{i}.mlp.c_fc.weight", 4 * d * d), (f"h.{i}.mlp.c_proj.weight", 4 * d * d)]
    chunk = choose_chunk_elems(named)
    layout = plan_layout(named, chunk)
    assert vocab * d <= chunk <= 2 * vocab * d
    assert layout.waste_elems / (layout.n_chunks * chunk) < 0.2


def test_a_parameter_larger_than_a_chunk_is_a_config_error():
    with pytest.raises(ConfigError, match="more than a chunk"):
        plan_layout([("big", 100)], 99)
    with pytest.raises(ConfigError):
        choose_chunk_elems([("big", 100)], candidates=[10, 50])


@settings(max_examples=40, deadline=None)
@given(sizes=sizes_st, chunk=st.integers(min_value=64, max_value=3000))
def test_oversized_parameters_get_chunks_of_their_own(sizes, chunk):
    named = [(f"p{i}", n) for i, n in enumerate(sizes)]
    layout = plan_layout(named, chunk, align=64, oversize=True)
    ends: dict[int, int] = {}
    for slot in layout.slots:
        size = layout.chunk_numel(slot.chunk)
        assert slot.offset + slot.numel <= size and slot.offset % 64 == 0
        assert slot.offset >= ends.get(slot.chunk, 0)
        ends[slot.chunk] = slot.offset + slot.numel
        if slot.numel > chunk:  # alone, in a chunk sized to it
            assert slot.offset == 0 and size == -(-slot.numel // 64) * 64
            assert [s for s in layout.slots if s.chunk == slot.chunk] == [slot]
        else:
            assert size == chunk
    assert layout.waste_elems == layout.total_elems - sum(sizes) >= 0


def test_a_chunk_cap_leaves_the_largest_parameter_alone():
    named = [("emb", 10_000)] + [(f"w{i}", 1_000) for i in range(20)]
    chunk = choose_chunk_elems(named, max_elems=3_000)
    assert 1_000 <= chunk <= 3_000
    layout = plan_layout(named, chunk, oversize=True)
    assert layout.chunk_numel(0) == 10_048 and layout.largest_chunk == 10_048
    assert choose_chunk_elems(named, max_elems=50_000) == choose_chunk_elems(named)
