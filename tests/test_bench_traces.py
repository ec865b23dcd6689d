"""Azure trace parsing: a real slice of the shared CSVs, and malformed files that stop with file and line."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from tokenyard.bench.traces import parse_trace, scale_length, trace_requests

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "traces"
CONV = TRACES / "azure_llm_2023_conv.csv"
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


@pytest.mark.skipif(not CONV.is_file(), reason=f"{CONV} not present")
def test_real_conv_trace_slice():
    parsed = parse_trace(CONV, limit=200)
    assert parsed.error is None and len(parsed.rows) == 200
    first = parsed.rows[0]
    # the first data row: 2023-11-16 18:15:46.6805900,374,44
    assert first.line == 2 and (first.context_tokens, first.generated_tokens) == (374, 44)
    assert first.time_s == pytest.approx(datetime(2023, 11, 16, 18, 15, 46, 680590, tzinfo=UTC).timestamp())
    assert all(b.time_s >= a.time_s for a, b in zip(parsed.rows, parsed.rows[1:]))
    reqs = trace_requests(parsed.rows[10:40], time_scale=10.0, length_scale=0.25, max_input_len=200,
                          max_output_len=50)
    assert reqs[0].arrival_s == 0.0
    span = parsed.rows[39].time_s - parsed.rows[10].time_s
    assert reqs[-1].arrival_s == pytest.approx(10 * span)
    assert all(1 <= r.input_len <= 200 and 1 <= r.output_len <= 50 for r in reqs)
    assert reqs[0].input_len == scale_length(parsed.rows[10].context_tokens, 0.25, 200)


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_file_with_blank_lines_and_numeric_times(tmp_path):
    p = write(tmp_path, HEADER + "10.5,100,20\n\n11.0,50,5\n12.25,7,0\n")
    parsed = parse_trace(p)
    assert parsed.error is None
    assert [(r.line, r.time_s, r.context_tokens, r.generated_tokens) for r in parsed.rows] == [
        (2, 10.5, 100, 20), (4, 11.0, 50, 5), (5, 12.25, 7, 0)]
    reqs = trace_requests(parsed.rows, time_scale=2.0)
    assert [r.arrival_s for r in reqs] == [0.0, 1.0, 3.5]
    assert reqs[2].output_len == 1  # at least one token, even for a zero-length row


@pytest.mark.parametrize("body, line, words", [
    ("2023-11-16 18:15:46.68,10,5\n2023-11-16 18:15:47.00,abc,5\n", 3, "ContextTokens 'abc'"),
    ("2023-11-16 18:15:46.68,10,5\n2023-11-16 18:15:47.00,10\n", 3, "expected 3 fields, got 2"),
    ("2023-11-16 18:15:46.68,10,5\nyesterday,10,5\n", 3, "yesterday"),
    ("2023-11-16 18:15:46.68,10,5\n2023-11-16 18:15:47.00,10,-4\n", 3, "GeneratedTokens -4 is below 0"),
    ("2023-11-16 18:15:46.68,10,5\n2023-11-16 18:15:47.00,0,4\n", 3, "ContextTokens 0 is below 1"),
    ("2023-11-16 18:15:46.68,10,5\n2023-11-16 18:15:45.00,10,4\n", 3, "goes backwards"),
])
def test_malformed_row_stops_with_file_and_line_and_keeps_rows(tmp_path, body, line, words):
    p = write(tmp_path, HEADER + body + "2023-11-16 18:20:00.00,10,5\n")
    parsed = parse_trace(p)
    assert parsed.error is not None
    msg = str(parsed.error)
    assert f"{p}:{line}" in msg and words in msg, msg
    assert len(parsed.rows) == 1 and parsed.rows[0].context_tokens == 10   # what came before is kept


def test_bad_header_empty_and_missing_files(tmp_path):
    parsed = parse_trace(write(tmp_path, "time,prompt\n1,2\n"))
    assert not parsed.rows and "header lacks column(s) TIMESTAMP, ContextTokens, GeneratedTokens" in str(
        parsed.error)
    assert "the file is empty" in str(parse_trace(write(tmp_path, "", "empty.csv")).error)
    assert "cannot open" in str(parse_trace(tmp_path / "nope.csv").error)
    binary = tmp_path / "bin2.csv"
    binary.write_bytes(HEADER.encode() + b"1,2,3\n\xff\xfegarbage,1,2\n")
    parsed = parse_trace(binary)
    assert f"{binary}:3" in str(parsed.error) and len(parsed.rows) == 1


def test_limit_stops_before_a_bad_row_outside_the_window(tmp_path):
    p = write(tmp_path, HEADER + "1,10,5\n2,10,5\nbroken\n")
    parsed = parse_trace(p, limit=2)
    assert parsed.error is None and len(parsed.rows) == 2


def test_bad_scales():
    with pytest.raises(ValueError, match="--trace-time-scale"):
        trace_requests([], time_scale=0)
    with pytest.raises(ValueError, match="--trace-length-scale"):
        trace_requests([], length_scale=-1)
