import pytest

from orchestrator.cli import main
from orchestrator.demo import format_table, run_demo


@pytest.mark.integration
def test_demo_on_packaged_minilm():
    rows = run_demo("minilm", n_sentences=16)
    bits = [r.average_bits for r in rows]
    assert min(bits) < 2.5 and max(bits) > 8
    by_bits = sorted(rows, key=lambda r: r.average_bits)
    # more bits: more bytes, embeddings closer to full precision
    assert [r.packed_bytes for r in by_bits] == sorted(r.packed_bytes for r in rows)
    assert by_bits[-1].relative_error < 0.05 < by_bits[0].relative_error
    assert by_bits[-1].cosine > 0.99
    # packed bytes agree with the paper's storage formula (no padding on MiniLM's matrices) plus 4-byte offsets
    for r in rows:
        assert r.packed_bytes == pytest.approx(r.average_bits * r.fp16_bytes / 2 / 8 + 4 * 36)
    assert "nf4 (QLoRA)" in format_table(rows)


def test_cli_reports_bad_model_clearly(capsys, tmp_path):
    assert main(["demo", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
