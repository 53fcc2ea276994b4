"""The benchmark suite: cases in their own processes, one JSON each, one table of them; failures named."""

import io
import json

import pytest
from PIL import Image
from test_benchmark import TINY
from webdataset.tariterators import tarfile_samples as tar_samples

from ssl_vit.bench.suite import make_jpeg_shards, render, select_cases, table_row
from ssl_vit.cli.main import main
from ssl_vit.data.demo import ensure_demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo"), n_train=32, n_knn_train=4, n_knn_val=4)


def _suite(out, demo, *extra):
    args = ["benchmark-suite", "--quick", "--out", str(out), "--steps", "2", "--shards", demo.train]
    for item in [*TINY, "data.shuffle_buffer=1", *extra]:
        args += ["--set", item]
    return args


def test_suite_runs_each_case_and_tables_its_json(tmp_path, demo, capsys):
    out = tmp_path / "suite"
    assert main([*_suite(out, demo), "--only", "mae_demo_synthetic", "mae_demo_real"]) == 0
    synthetic, real = (json.loads((out / f"{n}.json").read_text()) for n in ("mae_demo_synthetic", "mae_demo_real"))
    assert synthetic["synthetic"] and not real["synthetic"] and real["loader_images_per_s"] > 0
    assert "--synthetic" in synthetic["command"] and f"data.train={demo.train}" in real["command"]
    table = (out / "suite.md").read_text()
    assert table == capsys.readouterr().out.split("mae_demo_real ... ")[1].split("\n", 1)[1]  # printed, too
    rows = [line for line in table.splitlines() if line.startswith("| mae_demo")]
    assert rows == [table_row(synthetic), table_row(real)]  # in the suite's order
    assert f"| {real['images_per_s']:.0f} | {real['step_time_s'] * 1e3:.1f} |" in rows[1]


def test_a_failing_case_is_a_row_naming_why_and_exit_1(tmp_path, demo):
    out = tmp_path / "suite"
    assert main([*_suite(out, demo, "model.embed_dim=30"), "--only", "mae_demo_synthetic"]) == 1
    result = json.loads((out / "mae_demo_synthetic.json").read_text())
    assert result["error"] == ("ssl-vit benchmark: error: model.embed_dim: MAE's sin-cos position embedding needs "
                               "a multiple of 4, got 30")  # the case's own one-line error, its last line on stderr
    assert f"| mae_demo_synthetic | failed: {result['error']} |" in (out / "suite.md").read_text()


def test_a_case_past_its_timeout_is_stopped_and_named(tmp_path, demo):
    out = tmp_path / "suite"
    assert main([*_suite(out, demo), "--only", "mae_demo_real", "--case-timeout", "2"]) == 1
    assert json.loads((out / "mae_demo_real.json").read_text())["error"] == "timed out after 2 s"


def test_unknown_case_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown case.*mae_b16_synthetic, mae_b16_synthetic_compile"):
        select_cases(quick=False, only=["mae_b16"])


def test_table_row_of_a_loader_only_result():
    row = table_row({"case": "c", "synthetic": False, "loader_images_per_s": 812.4,
                     "loader_vs_workers_x_single_core": 0.912, "loader_cpu_ms_per_image": 1.234})
    assert row == "| c | loader only | 812 | — | — | — | — | 0.91 | 1.23 | — |"


def test_jpeg_shards_are_imagenet_sized_and_made_once(tmp_path):
    out = tmp_path / "shards"
    (tmp_path / "shards.tmp").mkdir()  # what an interrupted build left: started over, not reused
    (tmp_path / "shards.tmp" / "bench-000000.tar").write_bytes(b"cut short")
    pattern = make_jpeg_shards(out, images=3, per_shard=2)
    shards = sorted(out.glob("bench-*.tar"))
    assert len(shards) == 2 and pattern.endswith("bench-{000000..000001}.tar")
    assert not (tmp_path / "shards.tmp").exists()
    samples = list(tar_samples([dict(url=str(s)) for s in shards], None))
    assert len(samples) == 3 and Image.open(io.BytesIO(samples[0]["jpg"])).size == (500, 375)
    stamps = [s.stat().st_mtime_ns for s in shards]
    assert make_jpeg_shards(out, images=3, per_shard=2) == pattern
    assert [s.stat().st_mtime_ns for s in shards] == stamps


def test_the_table_holds_the_suites_cases_and_names_another_machines(tmp_path):
    out = tmp_path / "suite"
    out.mkdir()
    here = {"device": "NVIDIA H200", "torch": "2.15", "cuda": "13.2", "cpus": 16, "date_utc": "2026-11-22 10:00"}
    (out / "meta.json").write_text(json.dumps(here))
    result = {"synthetic": True, "images_per_s": 1000.0, "step_time_s": 0.064, "mfu": 0.5, "data_wait_share": 0.0,
              "peak_memory_bytes": 2**30, "encoder": {"masked_speedup": 3.5}}
    (out / "mae_b16_synthetic.json").write_text(json.dumps({**result, "case": "mae_b16_synthetic", "meta": here}))
    elsewhere = {**here, "device": "CPU (x86_64)", "date_utc": "2026-11-21 21:00"}
    (out / "mae_demo_synthetic.json").write_text(json.dumps({**result, "case": "mae_demo_synthetic",
                                                             "meta": elsewhere}))
    (out / "other.json").write_text('{"note": 1}')  # an `ssl-vit benchmark --out` of the user's, say
    rows = [line for line in render(out).splitlines() if line.startswith("| mae")]
    assert rows == ["| mae_b16_synthetic | synthetic | 1000 | 64.0 | 50.0% | 0.0% | 1.00 | — | — | 3.50 |",
                    "| mae_demo_synthetic (CPU (x86_64), 2026-11-21 21:00 UTC) | synthetic | 1000 | 64.0 | 50.0% | "
                    "0.0% | 1.00 | — | — | 3.50 |"]


def test_a_case_of_the_other_list_says_so():
    with pytest.raises(ValueError, match=r"unknown case\(s\) mae_demo_real \(with --quick\)"):
        select_cases(quick=False, only=["mae_demo_real"])


def test_ctrl_c_stops_the_case_too(tmp_path, monkeypatch):
    # the case runs in its own session, out of reach of the terminal's Ctrl-C: the suite must stop it itself
    import ssl_vit.bench.suite as suite

    killed = []

    class Case:
        pid = 4242

        def communicate(self, timeout=None):
            if not killed:
                raise KeyboardInterrupt
            return "", ""

    monkeypatch.setattr(suite.subprocess, "Popen", lambda *a, **k: Case())
    monkeypatch.setattr(suite.os, "killpg", lambda pid, sig: killed.append((pid, sig)))
    with pytest.raises(KeyboardInterrupt):
        suite.run_case(suite.QUICK_CASES[0], ["python", "-m", "ssl_vit", "benchmark"], tmp_path / "c.json", 60)
    assert killed == [(4242, suite.signal.SIGKILL)]


def test_a_shards_folder_of_another_size_is_made_anew(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "bench-000000.tar").write_bytes(b"an older, smaller build")
    make_jpeg_shards(out, images=3, per_shard=2)
    assert len(list(out.glob("bench-*.tar"))) == 2 and (out / "bench-000000.tar").stat().st_size > 1000
