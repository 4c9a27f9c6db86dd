"""Parts of a prediction: the split by size, the shared output lock, and parts run at once, killed or on devices."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from conftest import held_elsewhere, write
from pancreas_cli import locks
from pancreas_cli.cli import app
from pancreas_cli.devices import device_list
from pancreas_cli.exceptions import BusyError, DeviceError, PredictError
from pancreas_cli.parts import Part, run_workers, split, voxels
from pancreas_cli.predict import CaseOutcome, _Relay

REPO = Path(__file__).resolve().parents[1]


def test_parts_are_disjoint_complete_balanced_and_the_same_everywhere() -> None:
    rng = random.Random(0)
    for total in (1, 2, 3, 5):
        sizes = {f"case{i:02d}": rng.randrange(1, 10**6) for i in range(23)}
        found = split(sizes, total)
        names = [name for part in found for name in part]
        assert sorted(names) == sorted(sizes) and len(names) == len(set(names))  # each case exactly once
        loads = [sum(sizes[n] for n in part) for part in found]
        assert max(loads) - min(loads) <= max(sizes.values())  # each case went to the lightest part
        shuffled = dict(rng.sample(sorted(sizes.items()), len(sizes)))  # another machine lists them otherwise
        assert split(shuffled, total) == found
        assert all(part == sorted(part) for part in found)
    # by size, not by name: the big case alone, the small ones together; equal sizes alternate by name
    assert split({"a": 1, "b": 1, "c": 2, "d": 100}, 2) == [["d"], ["a", "b", "c"]]
    assert split({"a": 5, "b": 5, "c": 5, "d": 5}, 2) == [["a", "c"], ["b", "d"]]
    assert split({"a": 1}, 3) == [["a"], [], []]  # more parts than cases: the others have nothing to do


def test_part_numbers_and_devices_are_checked() -> None:
    assert Part.parse("1/2") == Part(1, 2) and str(Part(0, 3)) == "0/3"
    for text in ("2/2", "-1/2", "0/0", "1", "a/b", "1/2/3"):
        with pytest.raises(ValueError, match="0/2"):
            Part.parse(text)
    assert device_list("cpu, cpu", None) == ["cpu", "cpu"] and device_list(None, None) is None
    with pytest.raises(DeviceError, match="'gpu' is not a device"):
        device_list("cpu,gpu", None)
    with pytest.raises(DeviceError, match="both"):
        device_list("cpu", 2)
    with pytest.raises(DeviceError, match="--num-gpus 0"):
        device_list(None, 0)


@pytest.mark.parametrize(("options", "message"), [
    (["--part", "2/2"], "parts are numbered 0 to N-1"),
    (["--part", "0/2", "--num-parts", "2", "--part-id", "0"], "not both"),
    (["--part-id", "1"], "--num-parts and --part-id go together"),
    (["--devices", "cpu,cpu", "--part", "0/2"], "drop --part and --device"),
])
def test_part_options_that_do_not_go_together(runner: CliRunner, tmp_path: Path, options: list[str],
                                              message: str) -> None:
    result = runner.invoke(app, ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), *options])
    assert result.exit_code == 2 and message in result.output


def test_sizes_come_from_the_header(tmp_path: Path) -> None:
    image = write(np.zeros((5, 6, 7), np.int16), tmp_path / "a.nii.gz")
    assert voxels(image) == 5 * 6 * 7
    (tmp_path / "b.nii.gz").write_bytes(b"not an image")
    assert voxels(tmp_path / "b.nii.gz") == 0


def test_parts_of_one_prediction_share_the_folder_others_are_refused(tmp_path: Path) -> None:
    out, swept = tmp_path / "out", []
    with held_elsewhere(lambda: locks.output_part(out, "A", lambda: None)) as pid:
        with locks.output_part(out, "A", lambda: swept.append("A")):  # another part of the same prediction
            pass
        assert swept == []  # not alone: what is there may be the other part's
        with pytest.raises(BusyError, match=rf"the output folder {out} \(by parts of another prediction.*pid {pid}"):
            with locks.output_part(out, "B", lambda: None):
                pass
        with pytest.raises(BusyError, match=f"in use by pid {pid}"):  # a predict without parts
            with locks.output_folder(out):
                pass
    with held_elsewhere(lambda: locks.output_folder(out)) as pid:
        with pytest.raises(BusyError, match=f"in use by pid {pid}"):
            with locks.output_part(out, "A", lambda: None):
                pass
    with locks.output_part(out, "B", lambda: swept.append("B")):  # alone now: another prediction may start
        pass
    assert swept == ["B"]


def _report_or_die(send: Any, value: int) -> int:
    send(("message", value))
    if value == 2:
        os._exit(3)
    return value


def test_workers_report_and_die_loudly() -> None:
    """What workers send reaches the parent; one that dies (killed, out of memory) is named once all ended."""
    seen: list[tuple[int, Any]] = []
    with pytest.raises(PredictError, match=r"^two: ended with exit code 3 \(killed\?\)$"):
        run_workers(_report_or_die, [(1,), (2,)], ["one", "two"], lambda i, m: seen.append((i, m)))
    assert (0, ("message", 1)) in seen


class _Reporter:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def start(self, total: int, stream: Any) -> None:
        self.calls.append(("start", total))

    def working(self, case: str, detail: str) -> None:
        self.calls.append(("working", case))

    def case(self, outcome: CaseOutcome, index: int) -> None:
        self.calls.append(("case", outcome.case, index))

    def warn(self, text: str) -> None:
        self.calls.append(("warn", text))


def test_one_display_for_all_workers() -> None:
    reporter, warned = _Reporter(), []
    relay = _Relay(reporter, warned.append, 3)
    outcome = CaseOutcome("a", Path("a.nii.gz"), "predicted")
    relay.handle(0, ("warn", "no GPU"))
    relay.handle(0, ("start", 2))
    relay.handle(0, ("working", "a", "1 tile"))
    relay.handle(0, ("case", outcome))
    relay.handle(1, ("warn", "no GPU"))  # the same warning from another worker: shown once
    relay.handle(2, ("end",))  # a worker with nothing to do
    assert reporter.calls == [] and warned == ["no GPU"]  # waits until every worker said how many
    relay.handle(1, ("start", 1))
    relay.handle(1, ("case", CaseOutcome("b", Path("b.nii.gz"), "predicted")))
    relay.handle(1, ("warn", "b is not CT"))
    assert reporter.calls == [("start", 3), ("working", "a"), ("case", "a", 1), ("case", "b", 2), ("warn", "b is not CT")]


# Whole predictions with the trained smoke model: several processes, so kept to a few tiny cases.


def _scans(project: Path, folder: Path) -> Path:
    """Five scans of different sizes (crops of the test images), so that the split is by size."""
    images = sorted((project / "data" / "test").glob("*_0000.nii.gz"))
    for i, slices in enumerate((24, 20, 16, 24, 12)):
        image = sitk.ReadImage(str(images[i % len(images)]))
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image[:, :, :slices], str(folder / f"scan{i}.nii.gz"))
    return folder


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _assert_same_outputs(out: Path, expected: dict[str, bytes]) -> None:
    """The same masks and subtypes byte for byte; the same class probabilities to float rounding (a
    worker process with another torch thread count sums in another order: the 6th decimal may move)."""
    found = _outputs(out)
    probabilities = "subtype_probabilities.csv"
    assert {k: v for k, v in found.items() if k != probabilities} == \
        {k: v for k, v in expected.items() if k != probabilities}
    rows = [[line.split(",") for line in table[probabilities].decode().splitlines()] for table in (found, expected)]
    assert [[r[0], r[-1]] for r in rows[0]] == [[r[0], r[-1]] for r in rows[1]]
    assert all(abs(float(a) - float(b)) <= 1e-5 for x, y in zip(rows[0][1:], rows[1][1:])
               for a, b in zip(x[1:-1], y[1:-1]))


def _args(project: Path, source: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "-c", str(project / "pancseg.yaml"), "-i", str(source), "-o", str(out), "--fold", "4", *extra]


def _command(args: list[str], code: str = "from pancreas_cli.cli import main; main()") -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.argv = ['pancseg', *{args!r}]; {code}"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def one_run(trained_project: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """The scans and what one `pancseg predict` of them writes (masks and CSVs)."""
    root = tmp_path_factory.mktemp("one_run")
    source = _scans(trained_project, root / "in")
    result = CliRunner().invoke(app, _args(trained_project, source, root / "out"))
    assert result.exit_code == 0, result.output
    return source, _outputs(root / "out")


def _two_parts_at_once(project: Path, source: Path, out: Path, *extra: str) -> list[tuple[int, str, str]]:
    """``--part 0/2`` and ``--part 1/2`` as two commands started together; (exit code, stdout, stderr)
    of each, both checked to have succeeded."""
    parts = [subprocess.Popen(_command(_args(project, source, out, "--part", f"{i}/2", *extra)), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")
             for i in range(2)]
    done = [(code, stdout, stderr) for stdout, stderr, code in
            ((*p.communicate(timeout=600), p.returncode) for p in parts)]
    assert all(code == 0 for code, _, _ in done), [err for _, _, err in done]
    return done


@pytest.mark.slow
def test_two_parts_at_once_fill_the_folder_of_one_run(trained_project: Path, one_run: tuple[Path, dict[str, bytes]],
                                                      tmp_path: Path) -> None:
    source, expected = one_run
    out = tmp_path / "out"
    done = _two_parts_at_once(trained_project, source, out, "--json")
    results = [json.loads(stdout) for _, stdout, _ in done]
    cases = [[c["case"] for c in r["cases"]] for r in results]
    assert sorted(cases[0] + cases[1]) == [f"scan{i}" for i in range(5)] and not set(cases[0]) & set(cases[1])
    assert [r["part"] for r in results] == ["0/2", "1/2"]
    _assert_same_outputs(out, expected)  # the same masks, byte for byte, and the same CSVs
    again = CliRunner().invoke(app, _args(trained_project, source, out, "--part", "1/2"))
    assert again.exit_code == 0 and f"part 1/2: 0 predicted, {len(cases[1])} skipped" in again.stdout


@pytest.mark.slow
def test_parts_with_statistics_and_previews_summarise_every_case(trained_project: Path,
                                                                 one_run: tuple[Path, dict[str, bytes]],
                                                                 tmp_path: Path) -> None:
    """statistics.csv and preview/index.html are rebuilt one part at a time, as the subtype CSVs: after
    two parts started at once they list the cases of both."""
    source, _ = one_run
    out = tmp_path / "out"
    _two_parts_at_once(trained_project, source, out, "--statistics", "--preview")
    cases = [f"scan{i}" for i in range(5)]
    statistics = (out / "statistics.csv").read_text(encoding="utf-8").splitlines()
    assert sorted(line.split(",")[0] for line in statistics[1:]) == cases
    index = (out / "preview" / "index.html").read_text(encoding="utf-8")
    assert all(f"{case}.png" in index for case in cases)


@pytest.mark.slow
def test_a_killed_part_resumes(trained_project: Path, one_run: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    """SIGKILL while the part replaces its second mask; the same command finishes the part, the other
    part completes the folder."""
    source, expected = one_run
    out, marker = tmp_path / "out", tmp_path / "stuck"
    stall = ("from pancreas_cli import predict as p; real = p.write_record\n"
             "def slow(out, case, record):\n"
             "    real(out, case, record)\n"
             "    if record.get('pending') and len(list((out / '.pancseg').glob('*.json'))) == 2:\n"
             f"        open({str(marker)!r}, 'w').close(); import time; time.sleep(120)\n"
             "p.write_record = slow\nfrom pancreas_cli.cli import main; main()")
    part = subprocess.Popen(_command(_args(trained_project, source, out, "--part", "0/2"), stall), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and part.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"the part never reached its second case (exit code {part.poll()})"
    finally:
        os.killpg(part.pid, signal.SIGKILL)
        part.wait()
    runner = CliRunner()
    resumed = json.loads(runner.invoke(app, _args(trained_project, source, out, "--part", "0/2", "--json")).stdout)
    assert resumed["skipped"] == 1 and resumed["predicted"] >= 1 and not resumed["failed"]
    assert not list(out.rglob(".pancseg.tmp-*"))  # alone in the folder: what the killed part left is swept
    other = runner.invoke(app, _args(trained_project, source, out, "--num-parts", "2", "--part-id", "1"))  # nnU-Net's way
    assert other.exit_code == 0 and "part 1/2: 3 predicted" in other.stdout
    _assert_same_outputs(out, expected)


@pytest.mark.slow
def test_devices_give_the_files_of_one_process(trained_project: Path, one_run: tuple[Path, dict[str, bytes]],
                                               tmp_path: Path) -> None:
    source, expected = one_run
    out = tmp_path / "out"
    result = CliRunner().invoke(app, _args(trained_project, source, out, "--devices", "cpu,cpu"))
    assert result.exit_code == 0, result.output
    assert "5 predicted" in result.stdout
    assert [line.split()[0] for line in result.stderr.splitlines() if line.startswith("[")] == \
        [f"[{i}/5]" for i in range(1, 6)]  # one display: the cases of both workers numbered together
    _assert_same_outputs(out, expected)


@pytest.mark.slow
def test_a_part_of_another_prediction_is_refused(trained_project: Path, one_run: tuple[Path, dict[str, bytes]],
                                                 tmp_path: Path) -> None:
    source, _ = one_run
    out = tmp_path / "out"
    with held_elsewhere(lambda: locks.output_part(out, "another model's parts", lambda: None)) as pid:
        result = CliRunner().invoke(app, _args(trained_project, source, out, "--part", "0/2"))
    assert result.exit_code == 1
    assert f"the output folder {out} (by parts of another prediction" in result.stderr and f"pid {pid}" in result.stderr
    assert not out.exists()
