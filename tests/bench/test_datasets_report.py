"""Workloads and figures without a server: what both benches build on."""

from __future__ import annotations

import json

import pytest

from bench.datasets import Conversation, DatasetConfig, parse_range, read_jsonl, take
from bench.report import RequestRecord, distribution, format_table, summarize

VOCAB, SPECIAL = 500, (0, 1, 2)


def test_synthetic_workloads_are_seeded_prefixes_of_each_other():
    cfg = DatasetConfig(input_len=(4, 20), output_len=(2, 9), seed=3)
    few, more = take(cfg, 3, VOCAB, SPECIAL), take(cfg, 10, VOCAB, SPECIAL)
    assert few == more[:3]
    assert take(DatasetConfig(input_len=(4, 20), seed=4), 3, VOCAB, SPECIAL) != few
    for conv in more:
        (r,) = conv.turns
        assert 4 <= len(r.prompt_token_ids) <= 20 and 2 <= r.max_tokens <= 9 and r.ignore_eos
        assert not set(r.prompt_token_ids) & set(SPECIAL)


def test_shared_prefix_requests_share_exactly_the_prefix():
    convs = take(DatasetConfig("shared-prefix", prefix_len=40, suffix_len=8, output_len=(5, 9)), 4, VOCAB, SPECIAL)
    prompts = [c.turns[0].prompt_token_ids for c in convs]
    assert all(len(p) == 48 and p[:40] == prompts[0][:40] for p in prompts)
    assert len({tuple(p[40:]) for p in prompts}) == 4
    assert {c.turns[0].max_tokens for c in convs} == {5}


def test_multi_turn_prompts_resend_the_history():
    (conv,) = take(DatasetConfig("multi-turn", suffix_len=6, turns=3, output_len=(2, 2)), 1, VOCAB, SPECIAL)
    assert isinstance(conv, Conversation) and conv.resend_history and len(conv.turns) == 3
    first = conv.request(0, [])
    history = first.prompt_token_ids + [7, 7]                 # the reply joins the history
    second = conv.request(1, history)
    assert second.prompt_token_ids == history + conv.turns[1].prompt_token_ids
    assert len(second.prompt_token_ids) == 6 + 2 + 6


def test_jsonl_reads_prompts_chats_and_ids_and_names_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hi", "max_tokens": 3}\n\n{"messages": [{"role": "user", "content": "yo"}]}\n'
                    '{"prompt_token_ids": [1, 2]}\n')
    reqs = read_jsonl(good, output_len=(7, 7))
    assert [r.inputs() for r in reqs] == [{"prompt": "hi"}, {"messages": [{"role": "user", "content": "yo"}]},
                                          {"prompt_token_ids": [1, 2]}]
    assert [r.max_tokens for r in reqs] == [3, 7, 7] and not any(r.ignore_eos for r in reqs)
    cycled = take(DatasetConfig("jsonl", path=str(good)), 5, VOCAB)
    assert [c.turns[0].inputs() for c in cycled][3:] == [reqs[0].inputs(), reqs[1].inputs()]
    for text, why in [('{"prompt": "a", "messages": []}', "exactly one"), ("not json", "not JSON"),
                      ('{"prompt": "a", "max_tokens": 0}', "max_tokens"), ('{"messages": ["x"]}', "messages")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "fine"}\n' + text + "\n")
        with pytest.raises(ValueError, match=why) as e:
            read_jsonl(bad, output_len=(4, 4))
        assert ":2:" in str(e.value)


@pytest.mark.parametrize("text", ["0", "9:3", "a:b", ""])
def test_bad_ranges_are_refused(text):
    with pytest.raises(ValueError):
        parse_range(text)


def test_summary_figures_follow_their_definitions():
    records = [
        RequestRecord(ok=True, prompt_tokens=10, cached_prompt_tokens=4, output_tokens=5, ttft_s=0.1,
                      latency_s=0.5, itls_s=[0.1, 0.1, 0.2]),
        RequestRecord(ok=True, prompt_tokens=20, output_tokens=1, ttft_s=0.3, latency_s=0.3),
        RequestRecord(ok=False, error="UNAVAILABLE"),
    ]
    s = summarize(records, 2.0, slo_ttft_ms=200, slo_tpot_ms=150)
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, {"UNAVAILABLE": 1})
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 6)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 3.0 and s["total_token_throughput"] == 18.0
    assert s["prefix_cache_hit_rate"] == pytest.approx(4 / 30)
    # TPOT = (0.5 - 0.1) / (5 - 1); a one-token request has none.
    assert s["tpot_ms"]["count"] == 1 and s["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert s["itl_ms"]["count"] == 3 and s["itl_ms"]["max"] == pytest.approx(200.0)
    assert s["ttft_ms"]["median"] == pytest.approx(200.0)          # halfway between 100 and 300
    # Only the first meets TTFT <= 200 ms; its TPOT 100 ms meets 150 ms.
    assert s["goodput"] == {"slo_ttft_ms": 200, "slo_tpot_ms": 150, "good_requests": 1, "request_goodput": 0.5}
    assert "goodput" not in summarize(records, 2.0)


def test_distribution_and_table():
    d = distribution([0.001 * i for i in range(1, 101)])
    assert d["count"] == 100 and d["min"] == pytest.approx(1) and d["max"] == pytest.approx(100)
    assert d["median"] == pytest.approx(50.5) and d["p90"] == pytest.approx(90.1) and d["p99"] == pytest.approx(99.01)
    assert distribution([])["mean"] is None
    s = summarize([RequestRecord(ok=True, output_tokens=3, ttft_s=0.01, latency_s=0.05)], 1.0)
    table = format_table("title", ["c=1", "c=8"], [s, summarize([], 1.0)])
    assert "Median TTFT (ms)" in table and "P99 E2E latency (ms)" in table and "c=8" in table
    json.dumps(s)                               # every figure is plain JSON
