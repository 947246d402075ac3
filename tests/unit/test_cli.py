"""The CLI contract: assess / explain, exit codes, one-line errors on stderr, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhir_dm import cli
from tests import factories as f


@pytest.fixture
def seed_file(tmp_path: Path) -> Path:
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(f.bundle(*f.seed_case())))
    return path


def test_assess_prints_the_transaction_bundle(
    seed_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["assess", str(seed_file), "--now", "2015-10-25"]) == 0
    bundle = json.loads(capsys.readouterr().out)
    assert bundle["type"] == "transaction"
    assert (
        bundle["entry"][0]["resource"]["prediction"][0]["qualitativeRisk"]["coding"][0]["code"]
        == "high"
    )


def test_assess_writes_files_with_out(seed_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    p = f.patient()
    other.write_text(json.dumps(f.bundle(p, f.iim_condition(p))))
    out = tmp_path / "results"
    assert (
        cli.main(["assess", str(seed_file), str(other), "--now", "2024-04-01", "--out", str(out)])
        == 0
    )
    assert sorted(x.name for x in out.iterdir()) == ["other.result.json", "seed.result.json"]


def test_explain_summarises_each_patient(
    seed_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["explain", str(seed_file), "--now", "2015-10-25"]) == 0
    out = capsys.readouterr().out
    assert "High risk of IIM-associated cancer" in out
    assert "CONSIDER" in out and "Chest radiograph" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("{not json", "not JSON"),
        ('{"hello": "world"}', "not a FHIR resource"),
        ('{"resourceType": "Bundle", "type": "collection", "entry": []}', "no Patient"),
        (
            '{"resourceType": "Bundle", "type": "collection", '
            '"entry": [{"resource": {"resourceType": "Patient", "gender": 5}}]}',
            "gender",
        ),
        ('{"resourceType": "Nope"}', "unknown resourceType"),
    ],
)
def test_bad_input_one_line_and_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "input.json"
    if content is not None:
        path.write_text(content)
    assert cli.main(["assess", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_bad_configuration_exits_2(
    tmp_path: Path, seed_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--config", str(tmp_path), "assess", str(seed_file)]) == 2
    assert "configuration error" in capsys.readouterr().err


def test_bad_date_is_a_usage_error(seed_file: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["assess", str(seed_file), "--now", "21/11/2026"])
    assert exc.value.code == 2


def test_validate_output_flag_gives_the_same_result(
    seed_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["assess", str(seed_file), "--now", "2015-10-25"]) == 0
    fast = capsys.readouterr().out
    assert cli.main(["assess", str(seed_file), "--now", "2015-10-25", "--validate-output"]) == 0
    assert capsys.readouterr().out == fast
